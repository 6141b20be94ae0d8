"""Every rule of a job that the schema cannot see, checked once, on the driver, before any cluster
work: `check_job(config, verb)`. The CLI runs it for every verb (`--check` runs it and stops);
`tune` runs it on its base job.

It returns the job with every local relative path made absolute (`resolve_locations`), because
Ray Train workers, Ray Data actors and Tune trials run in working directories of their own: a
relative path means the caller's directory only once it is resolved where the caller runs. And it
raises one ConfigError listing every problem it found, each as `<key>: <what is wrong>; <the fix>`.

    every verb                 `name` is one folder name; inside `ray job submit`, no output
                               location is relative (it would go with the job's copy of the
                               working directory)
    train, reference, encode   data.path exists and is readable (path datasets), data.image_size
                               is set where the dataset needs it
    train                      train.initialize_from / train.teacher are model files whose network
                               settings / transport fit the job; the run folder takes writes;
                               scores during training (evaluation.every): a Ray backend, a
                               multiple of train.checkpoint_every, the sampler grid, a reference
    evaluate                   the sampler grid; the model file; the feature extractor reads its
                               images; the reference statistics exist, in that feature space (a
                               mu/sigma file: evaluation.reference_extractor declares it), of its
                               dimension
    generate                   the model file; the output folder takes writes
    encode                     encode.vae is an AutoencoderKL folder; the data are images of a
                               size it takes; the output folder takes writes
    reference                  the data are images (not latents); the statistics' folder takes writes

What needs more than the config and the files it names is checked where that is at hand, still
before work starts: the data's image shape against a model file by each training rank (it loads
the data; orchestrator.train.pretrained), resources once the cluster is joined
(orchestrator.cluster.check_fits), a resumable checkpoint by the Ray backend (check_resumable).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, TypeVar

from pydantic import BaseModel

from orchestrator import storage
from orchestrator.cluster import in_submitted_job
from orchestrator.config import DataConfig, JobConfig
from orchestrator.encode.run import image_shape_problem, output_folder as encode_output_folder
from orchestrator.encode.vae import VaeShape
from orchestrator.errors import ConfigError, JobError
from orchestrator.sample.decoder import decoded_shape, latent_vae_shape
from orchestrator.sample.extractors import extractor_spec
from orchestrator.sample.generate import output_folder as generate_output_folder
from orchestrator.sample.model_files import read_model_file, read_model_file_at
from orchestrator.sample.reference import image_data_problems, job_reference, load_reference_subset, reference_path
from orchestrator.sample.sampler_grid import grid_settings
from orchestrator.tracking import absolute_tracking_uri, sqlite_file
from orchestrator.train.posthoc import snapshot_problems, source_problems
from orchestrator.train.pretrained import misfit, model_sources
from ucgm_core.datasets import latents_have_flipped_copies
from ucgm_core.model_file import ModelFileContents

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The keys holding a local path or a URI, which `resolve_locations` makes absolute when local.
LOCATION_KEYS: tuple[str, ...] = (
    "output_dir",
    "data.path",
    "train.initialize_from",
    "train.teacher",
    "evaluation.model_file",
    "evaluation.reference_statistics",
    "evaluation.inception_weights",
    "evaluation.generation.out",
    "encode.vae",
    "encode.out",
    "posthoc_ema.run_dir",
)
TRACKING_URI_KEY = "tracking.tracking_uri"

# Datasets read from data.path (ucgm_core.datasets), and what they expect to find there.
_PATH_DATASETS = {
    "image_folder": "a folder with one sub-folder of images per class (path/<class>/*.png)",
    "parquet": "a parquet file or a folder of parquet shards with columns image and label",
    "latents": "the folder `python -m orchestrator encode` wrote (its encode.out)",
}
_OPTIONAL_PATH_DATASETS = {"fashion_mnist": "the folder holding the four *-ubyte.gz files (or remove data.path for the Debian package's)"}
# Datasets that resize every image to data.image_size and have no size of their own to fall back on.
_DATASETS_NEEDING_IMAGE_SIZE = ("image_folder",)
_VERBS_READING_DATA = ("train", "reference", "encode")

_STORAGE_HINT = "check that it exists and this user may read it; for s3:// that the bucket exists and AWS_* credentials / AWS_ENDPOINT_URL are set"


def check_job(config: JobConfig, verb: str) -> JobConfig:
    """`config` with its locations resolved, once every rule of `verb` holds (see the module
    docstring); otherwise ConfigError listing every problem, each with its key and fix."""
    if verb not in _VERB_CHECKS:  # a verb of orchestrator.verbs must list its rules there
        raise ValueError(f"no job checks for verb {verb!r}; add them to job_checks._VERB_CHECKS (verbs: {list(_VERB_CHECKS)})")
    problems = _outlive_problems(config, verb)  # on the paths as given: relative is what it refuses
    config = resolve_locations(config)
    name_problems = _name_problems(config.name)
    problems += name_problems
    if verb in _VERBS_READING_DATA:
        problems += _data_problems(config.data)
    problems += _VERB_CHECKS[verb](config)
    if not name_problems:  # a name that leaves output_dir must not create folders there
        problems += _writable_problems(config, verb)
    if problems:
        raise ConfigError.of_job(problems)
    return config


def resolve_locations(config: JobConfig) -> JobConfig:
    """`config` with every local relative path (LOCATION_KEYS) made absolute against the working
    directory, and the MLflow store too when it is a relative SQLite file (or the default store,
    when tracking is on). URIs (s3://, http://) are left as they are. Resolving twice changes
    nothing."""
    updates: dict[str, Any] = {key: storage.absolute(value) for key in LOCATION_KEYS if (value := _value(config, key))}
    tracking = config.tracking
    if tracking.tracking_uri or tracking.enabled:
        updates[TRACKING_URI_KEY] = absolute_tracking_uri(tracking.tracking_uri)
    return _replaced(config, updates)


def _value(config: JobConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), config)


def _replaced(section: BaseModel, updates: dict[str, Any]) -> Any:
    """`section` with dotted keys replaced, nested sections copied (paths need no re-validation)."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    direct.update({head: _replaced(getattr(section, head), inner) for head, inner in nested.items()})
    return section.model_copy(update=direct)


# --------------------------------------------------------------------------- problems as lines


def _problems_of(key: str, check: Callable[[], T]) -> tuple[T | None, list[str]]:
    """(what `check` returns, []) or (None, its problems as lines that start with `key`)."""
    try:
        return check(), []
    except ConfigError as error:
        return None, list(error.problems) or [_keyed(key, str(error))]
    except (JobError, FileNotFoundError) as error:  # ours name what is wrong and the fix
        return None, [_keyed(key, str(error))]
    except ImportError:  # a package missing is the environment's problem, not the job's
        raise
    except Exception as error:  # a storage backend's or a loader's failure
        return None, [f"{key}: cannot be read ({type(error).__name__}: {error}); {_STORAGE_HINT}"]


def _keyed(key: str, message: str) -> str:
    return message if message.startswith(f"{key}:") else f"{key}: {message}"


# --------------------------------------------------------------------------- every verb


def _name_problems(name: str) -> list[str]:
    if name and name not in (".", "..") and "/" not in name and "\\" not in name:
        return []
    return [f"name: {name!r} is not one folder name (the run folder is <output_dir>/<name>); use a name without '/', such as digits-run2"]


def output_locations(config: JobConfig, verb: str) -> dict[str, str]:
    """Where a verb writes, by config key, as the job gives it: its run folder or explicit
    output, and the MLflow store."""
    evaluation = config.evaluation
    explicit = {
        "generate": ("evaluation.generation.out", evaluation.generation.out),
        "encode": ("encode.out", config.encode.out),
        "ema": ("posthoc_ema.out", config.posthoc_ema.out),
        # without an explicit file, reference statistics go beside the data, else under output_dir
        "reference": ("evaluation.reference_statistics", evaluation.reference_statistics) if evaluation.reference_statistics else ("data.path", config.data.path),
    }
    key, path = explicit.get(verb, ("output_dir", None))
    locations = {key: path} if path else {"output_dir": config.output_dir}
    if config.tracking.enabled and verb in ("train", "evaluate"):
        uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns/mlflow.db"
        locations["tracking.tracking_uri (or MLFLOW_TRACKING_URI)"] = sqlite_file(uri) or uri
    return locations


def _outlive_problems(config: JobConfig, verb: str) -> list[str]:
    """In a submitted job, relative local output locations: they would resolve inside Ray's
    temporary copy of the working directory, which goes with the cluster's session and which a
    re-submitted job (new code, new copy) does not see, so its checkpoints would be lost and the
    job would start over instead of resuming."""
    if not in_submitted_job():
        return []
    return [
        f"{key}: {path!r} is relative, so in a submitted job it would land in the job's temporary copy of the working "
        f"directory ({os.getcwd()}); pass an absolute path on storage every node sees, or s3://bucket/prefix"
        for key, path in output_locations(config, verb).items()
        if not storage.is_uri(path) and not os.path.isabs(path)
    ]


def check_outputs_outlive_the_job(config: JobConfig, verb: str) -> None:
    """The rule of `_outlive_problems` alone (check_job applies it with the others)."""
    problems = _outlive_problems(config, verb)
    if problems:
        raise ConfigError.of_job(problems)


def _output_folder(config: JobConfig, verb: str) -> tuple[str, str]:
    """(the key that places it, the folder) where `verb` writes."""
    if verb == "generate":
        return ("evaluation.generation.out" if config.evaluation.generation.out else "output_dir"), generate_output_folder(config)
    if verb == "encode":
        return ("encode.out" if config.encode.out else "output_dir"), encode_output_folder(config)
    if verb == "reference":  # beside the data, or under output_dir, unless set
        return "evaluation.reference_statistics", reference_path(config).rsplit("/", 1)[0]
    if verb == "ema" and config.posthoc_ema.out:
        return "posthoc_ema.out", config.posthoc_ema.out.rsplit("/", 1)[0]
    return "output_dir", config.run_dir  # train's run folder; evaluate writes <run_dir>/evaluation


def _writable_problems(config: JobConfig, verb: str) -> list[str]:
    key, folder = _output_folder(config, verb)
    return _problems_of(key, lambda: storage.check_writable(folder))[1]


# --------------------------------------------------------------------------- data


def _data_problems(data: DataConfig) -> list[str]:
    problems = []
    expected = _PATH_DATASETS.get(data.name) or _OPTIONAL_PATH_DATASETS.get(data.name)
    if data.name in _PATH_DATASETS and data.path is None:
        problems.append(f"data.path: dataset {data.name} reads {expected}; set data.path (a local path or s3://)")
    if data.name in _DATASETS_NEEDING_IMAGE_SIZE and data.image_size is None:
        problems.append(
            f"data.image_size: dataset {data.name} resizes every image to data.image_size x data.image_size and has no "
            "default; set it, e.g. data.image_size=64"
        )
    if data.path is not None and expected is not None:
        problems += _readable_problems("data.path", data.path, expected)
    if not problems and data.name == "latents" and data.horizontal_flip:
        flipped, found = _problems_of("data.path", lambda: latents_have_flipped_copies(data.path))
        problems += found
        if flipped is False:
            problems.append(
                f"data.horizontal_flip: the latents at {data.path!r} hold no flipped copies, and a flipped latent is not the "
                "latent of the flipped image; encode them again with encode.horizontal_flip: true, or remove data.horizontal_flip"
            )
    return problems


def _readable_problems(key: str, path: str, expected: str) -> list[str]:
    found, problems = _problems_of(key, lambda: storage.exists(path))
    if problems:
        return problems
    if not found:
        return [f"{key}: nothing at {path!r}; point it at {expected}"]
    if not storage.is_uri(path) and not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        return [f"{key}: {path!r} is not readable by this user; change its permissions, or point {key} at a copy that is readable"]
    return []


# --------------------------------------------------------------------------- per verb


def _train_problems(config: JobConfig) -> list[str]:
    problems = []
    for key, path in model_sources(config).items():
        read, found = _problems_of(key, lambda: read_model_file_at(key, path))
        problems += found
        if read is not None:
            # what the config tells; the data's shape is compared by each rank once it has the data
            problems += [problem for problem in [misfit(key, path, read[1], config)] if problem]
    return problems + _scoring_problems(config)


def _scoring_problems(config: JobConfig) -> list[str]:
    """Scores during training (evaluation.every): a Ray backend, checkpoint steps, the grid, a
    reference. The reference's feature space against the extractor is checked by the first
    evaluation (it needs the data's image shape), and a mismatch there is not retried."""
    every = config.evaluation.every
    if not every:
        return []
    problems = []
    if config.distributed.backend == "local":
        problems.append("evaluation.every: scores during training run on a Ray actor pool; use distributed.backend=ray or set evaluation.every=0")
    if every % config.train.checkpoint_every:
        problems.append(
            f"evaluation.every: {every} steps is no multiple of train.checkpoint_every={config.train.checkpoint_every}, "
            "and only checkpointed steps are scored; choose a multiple"
        )
    problems += _problems_of("evaluation.sampler_grid", lambda: grid_settings(config))[1]
    reference, found = _problems_of("evaluation.reference_statistics", lambda: job_reference(config, None))
    if found:
        found = [f"{problem} (evaluation.every scores against it: compute it first with `python -m orchestrator reference <job.yaml>`)" for problem in found]
    return problems + found


def _model_file(config: JobConfig) -> tuple[ModelFileContents | None, list[str]]:
    read, problems = _problems_of("evaluation.model_file", lambda: read_model_file(config))
    return (read[1] if read is not None else None), problems


def _sampled_image_shape(config: JobConfig, contents: ModelFileContents) -> tuple[tuple[int, int, int] | None, list[str]]:
    """(C, H, W) of the images the model file's samples become (decoded by encode.vae for a
    latent-space model)."""
    latent, problems = _problems_of("encode.vae", lambda: latent_vae_shape(config, contents))
    if problems:
        return None, problems
    shape = (contents.in_channels, contents.input_size, contents.input_size)
    return (decoded_shape(latent, shape) if latent is not None else shape), []


def _evaluate_problems(config: JobConfig) -> list[str]:
    _, problems = _problems_of("evaluation.sampler_grid", lambda: grid_settings(config))
    contents, found = _model_file(config)
    problems += found
    extractor = None  # the feature space; unknown without a readable model file
    if contents is not None:
        image_shape, found = _sampled_image_shape(config, contents)
        problems += found
        spec, found = (None, []) if image_shape is None else _problems_of("evaluation.extractor", lambda: extractor_spec(config, image_shape))
        problems += found
        if spec is not None:
            weights_key = "evaluation.inception_weights" if config.evaluation.inception_weights else "evaluation.extractor"
            extractor, found = _problems_of(weights_key, lambda: spec.build("cpu"))
            problems += found
    # our sums or published mu/sigma (declared by evaluation.reference_extractor), of this feature space
    reference, found = _problems_of("evaluation.reference_statistics", lambda: job_reference(config, extractor))
    problems += found
    if reference is not None and config.evaluation.precision_recall_samples:
        subset, found = _problems_of("evaluation.reference_statistics", lambda: load_reference_subset(reference_path(config)))
        problems += found
        k = config.evaluation.precision_recall_k
        if subset is None or len(subset.index) <= k:
            problems.append(
                f"evaluation.precision_recall_samples: precision/recall need features of reference images, and "
                f"{reference_path(config)!r} holds {'none' if subset is None else len(subset.index)}; compute the reference with "
                "`python -m orchestrator reference <job.yaml>` and the same evaluation.precision_recall_samples (a published "
                "mu/sigma file has no features), or set evaluation.precision_recall_samples=0"
            )
    if config.posthoc_ema.sigma_rel is not None:  # evaluate scores that EMA length, reconstructed from snapshots
        problems += source_problems(config)
    return problems


def _generate_problems(config: JobConfig) -> list[str]:
    contents, problems = _model_file(config)
    if contents is not None:
        problems += _sampled_image_shape(config, contents)[1]
    return problems


def _encode_problems(config: JobConfig) -> list[str]:
    problems = []
    if config.data.name == "latents":
        problems.append("data.name: encode reads images; point data at the image dataset, not at latents")
    vae = config.encode.vae
    if vae is None:
        return problems + ["encode.vae: encode needs the VAE, a diffusers AutoencoderKL folder (local or s3://); set encode.vae or vae="]
    shape, found = _problems_of("encode.vae", lambda: VaeShape.read(vae))
    problems += found
    size = config.data.image_size
    if shape is not None and size is not None:  # without a size only an image tells; run_encode reads one
        problems += [problem for problem in [image_shape_problem(shape, (shape.in_channels, size, size))] if problem]
    return problems


_VERB_CHECKS: dict[str, Callable[[JobConfig], list[str]]] = {
    "train": _train_problems,
    "evaluate": _evaluate_problems,
    "generate": _generate_problems,
    "encode": _encode_problems,
    "ema": snapshot_problems,  # the length to reconstruct, the run's snapshots and model.pt
    "reference": image_data_problems,  # and its data and its folder, checked for every verb that has them
}
