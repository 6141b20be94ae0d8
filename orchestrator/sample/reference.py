"""The `reference` verb and reference statistics: what `evaluate` scores samples against.

reference: the feature statistics of a dataset split, on a Ray Data actor pool (the evaluation
section's num_actors, cpus_per_actor, gpus_per_actor), so a dataset of any size (ImageNet) is
never gathered on one process:

    block table                             rows (start, stop): the image indices cut into blocks
                                            of evaluation.batch_size, built on the driver
      .map_batches(BlockStatistics)         one feature extractor per actor; each actor reads its
                                            block's images itself (ucgm_core.datasets.open_image_source:
                                            image_folder and parquet decode only those) -> features
                                            -> float64 (n, sum f, sum f f^T)
    driver: adds the partial sums in block order (never images or features), and stores them
            as a small .npz (n, sum f, sum f f^T, and the extractor's identifier).

Adding in block order, not in the order the actors finish, makes the result the same for any
number of actors (the float64 sums then differ only by the order of the blocks' own round-off).

A reference file is either ours (count, feature_sum, outer_sum, extractor), or a published one
holding only `mu` and `sigma` (the ADM evaluator's VIRTUAL_imagenet256_labeled.npz, pytorch-fid,
clean-fid), which records no feature space: `evaluation.reference_extractor` declares it. Either
way `evaluate` refuses statistics of another feature space than its own.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator import storage
from orchestrator.actor_pools import actor_device, actor_resources, connect_for_pool, object_column
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError, ReferenceStatisticsError
from orchestrator.sample.extractors import ExtractorSpec, extractor_spec
from orchestrator.summary import VerbSummary
from ucgm_core.datasets import ImageSource, open_image_source
from ucgm_core.features import DIGIT_CLASSIFIER_NAME, FeatureExtractor
from ucgm_core.fid import FeatureStatistics, GaussianStatistics
from ucgm_core.inception import INCEPTION_EXTRACTOR_NAME

logger = logging.getLogger(__name__)

SUM_ARRAYS = frozenset({"count", "feature_sum", "outer_sum"})  # ours, written by `save_reference`
MOMENT_ARRAYS = frozenset({"mu", "sigma"})  # published: ADM evaluator, pytorch-fid, clean-fid

Reference = FeatureStatistics | GaussianStatistics


def default_reference_path(config: JobConfig, extractor_name: str) -> str:
    """Where `reference` writes and `evaluate` looks: beside the data when it has a path
    (`<data.path>-reference-<split>[-size<N>][-limit<N>]-<extractor>.npz`), else under
    `<output_dir>/reference/`."""
    data = config.data
    tag = config.evaluation.reference_split
    tag += f"-size{data.image_size}" if data.image_size else ""
    tag += f"-limit{data.limit}" if data.limit else ""
    if data.path:
        return f"{data.path.rstrip('/')}-reference-{tag}-{extractor_name}.npz"
    return storage.join(config.output_dir, "reference", f"{data.name}-{tag}-{extractor_name}.npz")


def reference_path(config: JobConfig) -> str:
    return config.evaluation.reference_statistics or default_reference_path(config, config.evaluation.extractor)


def save_reference(
    path: str, statistics: FeatureStatistics, extractor_identifier: str, description: str, subset: FeatureSubset | None = None
) -> None:
    """Write statistics as .npz, with the feature space and the data they describe, and the
    features of a subset of the images for precision/recall."""
    buffer = io.BytesIO()
    extra = {"subset_index": subset.index, "subset_features": subset.features} if subset is not None else {}
    np.savez(
        buffer,
        count=np.asarray(statistics.count, dtype=np.int64),
        feature_sum=statistics.feature_sum,
        outer_sum=statistics.outer_sum,
        extractor=np.asarray(extractor_identifier),
        description=np.asarray(description),
        **extra,
    )
    storage.write_bytes(path, buffer.getvalue())


@dataclass
class FeatureSubset:
    """Feature vectors of some images (rows `index` of the data, or sample indices), float32 (M, D)."""

    index: np.ndarray
    features: np.ndarray


def subset_rows(num_images: int, size: int, seed: int) -> np.ndarray:
    """The rows whose features a reference keeps for precision/recall: `size` of them drawn
    without replacement by a generator seeded with the job seed, in ascending order."""
    return np.sort(np.random.default_rng([seed, num_images]).permutation(num_images)[: min(size, num_images)])


def load_reference_subset(path: str) -> FeatureSubset | None:
    """The subset features a reference file holds (written by `reference` with
    evaluation.precision_recall_samples), or None."""
    with storage.open_file(path) as handle, np.load(handle, allow_pickle=False) as arrays:
        if "subset_features" not in arrays.files:
            return None
        return FeatureSubset(arrays["subset_index"], arrays["subset_features"])


# --------------------------------------------------------------------------- reading a reference


def names_feature_space(declared: str, identifier: str) -> bool:
    """Whether `declared` (evaluation.reference_extractor) names the feature space `identifier`
    describes: the full identifier (name, weights' sha256, preprocessing), or the extractor's name
    alone (`inception-v3-tf-pool3`, the part before the parameters), which says which network's
    features a file holds but pins neither its weights file nor its preprocessing."""
    declared = declared.strip()
    return declared == identifier or declared == identifier.split("(", 1)[0]


def load_reference(
    path: str, extractor_identifier: str | None, *, declared_extractor: str | None = None, feature_dim: int | None = None
) -> Reference:
    """The reference statistics at `path`: ours (FeatureStatistics, written by `reference`) or
    published mu/sigma (GaussianStatistics). Refused (ReferenceStatisticsError) when they are of
    another feature space than `extractor_identifier` (None: not compared, for when it is
    unknown), when a mu/sigma file has no `declared_extractor` (evaluation.reference_extractor),
    when a declared extractor disagrees with what our file records, or when their dimension is
    not `feature_dim` (None: not compared). Reads only the arrays it needs (not the ADM file's
    images)."""
    if not storage.exists(path):
        raise ReferenceStatisticsError(
            f"no reference statistics at {path!r}; compute them once with "
            "`python -m orchestrator reference <job.yaml>` (same job spec), or set evaluation.reference_statistics"
        )
    try:
        with storage.open_file(path) as handle, np.load(handle, allow_pickle=False) as arrays:
            names = set(arrays.files)
            if SUM_ARRAYS <= names:
                statistics: Reference = FeatureStatistics(int(arrays["count"]), arrays["feature_sum"], arrays["outer_sum"])
                recorded = str(arrays["extractor"]) if "extractor" in names else None
            elif names & MOMENT_ARRAYS:
                _check_moment_arrays(path, names, declared_extractor, extractor_identifier)
                statistics, recorded = GaussianStatistics(arrays["mu"], arrays["sigma"]), None
            else:
                raise ReferenceStatisticsError(
                    f"{path!r} holds neither reference statistics of `python -m orchestrator reference` (arrays count, "
                    f"feature_sum, outer_sum) nor published ones (arrays mu, sigma); it has {sorted(names)}"
                )
    except ReferenceStatisticsError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # not an .npz, or arrays of the wrong shape
        raise ReferenceStatisticsError(f"{path!r} is no usable reference statistics file (.npz): {error}") from None
    if recorded is not None and declared_extractor is not None and not names_feature_space(declared_extractor, recorded):
        raise ReferenceStatisticsError(
            f"reference statistics {path!r} record their feature space, {recorded}, but evaluation.reference_extractor "
            f"declares {declared_extractor!r}; unset evaluation.reference_extractor (our .npz records its own), or point "
            "evaluation.reference_statistics at the statistics you meant"
        )
    if extractor_identifier is not None:
        if recorded is not None or declared_extractor is None:
            if (recorded or "<not recorded>") != extractor_identifier:
                raise ReferenceStatisticsError(
                    f"reference statistics {path!r} were computed with {recorded or '<not recorded>'}, but this evaluation "
                    f"uses {extractor_identifier}; distances across feature spaces mean nothing. Recompute them with "
                    "`python -m orchestrator reference <job.yaml>`"
                )
        elif not names_feature_space(declared_extractor, extractor_identifier):
            raise ReferenceStatisticsError(
                f"reference statistics {path!r} are declared (evaluation.reference_extractor) to be of {declared_extractor!r}, "
                f"but this evaluation uses {extractor_identifier}; distances across feature spaces mean nothing. Use a "
                f"reference of {_name(extractor_identifier)} features, or the evaluation.extractor the reference was computed with"
            )
    if feature_dim is not None and statistics.dim != feature_dim:
        raise ReferenceStatisticsError(
            f"reference statistics {path!r} are of {statistics.dim}-d features, but "
            f"{_name(extractor_identifier) if extractor_identifier else 'the extractor'} gives {feature_dim}-d ones; "
            "they are not statistics of this feature space"
        )
    return statistics


def _check_moment_arrays(path: str, names: set[str], declared: str | None, identifier: str | None) -> None:
    missing = sorted(MOMENT_ARRAYS - names)
    if missing:
        raise ReferenceStatisticsError(
            f"{path!r} looks like published statistics but lacks array {missing[0]!r}; a mu/sigma reference holds "
            "mu (D,) and sigma (D, D), the mean and np.cov of the features"
        )
    if declared is None:
        name = _name(identifier) if identifier else INCEPTION_EXTRACTOR_NAME
        raise ReferenceStatisticsError(
            f"{path!r} holds published mu/sigma statistics, which do not record the features they were computed with; "
            f"declare them: set evaluation.reference_extractor={name} if they are {name} features "
            f"(for the ADM evaluator's VIRTUAL_imagenet256_labeled.npz: evaluation.reference_extractor={INCEPTION_EXTRACTOR_NAME})"
        )


def _name(identifier: str) -> str:
    return identifier.split("(", 1)[0]


def job_reference(config: JobConfig, extractor: FeatureExtractor | None) -> Reference:
    """The job's reference statistics (evaluation.reference_statistics, declared by
    evaluation.reference_extractor), checked against `extractor` (None: its feature space is
    unknown, only the file itself is checked)."""
    return load_reference(
        reference_path(config),
        extractor.identifier() if extractor is not None else None,
        declared_extractor=config.evaluation.reference_extractor,
        feature_dim=extractor.feature_dim if extractor is not None else None,
    )


# --------------------------------------------------------------------------- the verb


def image_data_problems(config: JobConfig) -> list[str]:
    """Why the job's data are no images to take reference statistics of (checked by job_checks
    too, before any work)."""
    if config.data.name != "latents":
        return []
    return [
        "data.name: latents are VAE latents, not images, and reference statistics are of images (what evaluate "
        "compares the decoded samples with); point data at the image dataset the latents were encoded from "
        "(data.name, data.path, data.image_size as the encode job had them)"
    ]


def block_table(num_images: int, block_size: int):
    """The Ray Dataset of rows (start, stop): [0, num_images) cut into blocks of `block_size`,
    one Ray Data block each so the actors share them; built on the driver (16 bytes a row), so no
    read task competes with the actors for CPUs."""
    import pyarrow as pa
    import ray

    starts = np.arange(0, num_images, block_size, dtype=np.int64)
    return ray.data.from_arrow([pa.table({"start": [start], "stop": [min(start + block_size, num_images)]}) for start in starts])


class BlockStatistics:
    """A Ray Data actor: the image source and one feature extractor; each input row names a block
    of image indices [start, stop), which it reads itself and turns into one row of float64 sums."""

    def __init__(self, source: list[Any], extractor: ExtractorSpec, cpus: float, subset: np.ndarray | None = None):
        import ray

        self.device = actor_device(cpus)
        self.source: ImageSource = source[0] if isinstance(source[0], ImageSource) else ray.get(source[0])
        self.extractor = extractor.build(self.device)
        self.subset = subset if subset is not None else np.zeros(0, dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts, kept_index, kept_features = [], [], []
        for start, stop in zip(batch["start"], batch["stop"]):
            images = self.source.read(range(int(start), int(stop))).to(self.device)
            features = self.extractor(images)
            parts.append(FeatureStatistics.from_features(features))
            keep = self.subset[(self.subset >= start) & (self.subset < stop)]
            kept_index.append(keep)
            kept_features.append(features[torch.from_numpy(keep - start).to(features.device)].float().cpu().numpy())
        return {
            "start": np.asarray(batch["start"], dtype=np.int64),
            "count": np.asarray([p.count for p in parts], dtype=np.int64),
            "feature_sum": np.stack([p.feature_sum for p in parts]),
            "outer_sum": np.stack([p.outer_sum for p in parts]),
            "subset_index": object_column(kept_index),
            "subset_features": object_column(kept_features),
        }


def merge_in_block_order(rows, dim: int, progress=None) -> FeatureStatistics:
    """Add the rows (start, count, feature_sum, outer_sum) of consecutive blocks from 0 in the
    order of their start, whatever order they arrive in: the sum sorting them by start would give,
    holding only the blocks that arrived before an earlier one."""
    merged = FeatureStatistics.empty(dim)
    waiting: dict[int, FeatureStatistics] = {}
    for block in rows:
        for row in range(len(block["start"])):
            waiting[int(block["start"][row])] = FeatureStatistics(int(block["count"][row]), block["feature_sum"][row], block["outer_sum"][row])
        while merged.count in waiting:
            part = waiting.pop(merged.count)
            merged = merged.merge(part)
            if progress is not None:
                progress.update(part.count)
    if waiting:
        raise RuntimeError(f"blocks starting at {sorted(waiting)[:5]} came without the blocks before them (merged {merged.count} images)")
    return merged


@dataclass
class ReferenceSummary(VerbSummary):
    path: str
    count: int
    extractor: str
    dataset: str
    seconds: float


def run_reference(config: JobConfig) -> ReferenceSummary:
    """Statistics of the job's dataset split in the job's feature space, computed on an actor
    pool (see the module docstring) and written to evaluation.reference_statistics (default:
    `default_reference_path`)."""
    import ray

    started = time.perf_counter()
    evaluation, data = config.evaluation, config.data
    problems = image_data_problems(config)
    if problems:
        raise ConfigError.of_job(problems)
    # Inception reads RGB: a grey image gives the same features either way (it is repeated to 3
    # channels, as PIL's L -> RGB does), and every batch of image_folder / parquet then has one
    # shape; the digit classifier reads grey, and a colour dataset is refused below
    channels = None if evaluation.extractor == DIGIT_CLASSIFIER_NAME else 3
    try:
        source = open_image_source(
            data.name, path=data.path, image_size=data.image_size, limit=data.limit, split=evaluation.reference_split, channels=channels
        )
    except ValueError as error:
        raise ConfigError.of_job([f"data: {error}"]) from None
    image_shape = tuple(source.read([0]).shape[1:])
    spec = extractor_spec(config, image_shape)
    extractor = spec.build("cpu")  # for its identifier and dimension; the actors build their own
    identifier, dim = extractor.identifier(), extractor.feature_dim
    del extractor
    num_images = len(source)

    connect_for_pool(config)
    resources = actor_resources(config)
    table = block_table(num_images, evaluation.batch_size)
    num_blocks = -(-num_images // evaluation.batch_size)
    subset = subset_rows(num_images, evaluation.precision_recall_samples, config.seed) if evaluation.precision_recall_samples else None
    partial_sums = table.map_batches(
        BlockStatistics,
        fn_constructor_kwargs={"source": [ray.put(source)], "extractor": spec, "cpus": resources.cpus, "subset": subset},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(resources.count, num_blocks)),
        **resources.remote_args(),
    )
    logger.info(
        "reference statistics of %s (%d images, %d blocks) on %d actors (%g CPU, %g GPU each) with %s",
        source.name, num_images, num_blocks, min(resources.count, num_blocks), resources.cpus, resources.gpus, identifier,
    )
    from tqdm import tqdm

    kept: list[tuple[np.ndarray, np.ndarray]] = []

    def blocks():  # the sums go to the ordered merge; the subset's features are kept on the way
        for block in partial_sums.iter_batches(batch_size=None, batch_format="numpy"):
            kept.extend(zip(block["subset_index"], block["subset_features"]))
            yield block

    with tqdm(total=num_images, desc="reference", unit="image") as progress:
        statistics = merge_in_block_order(blocks(), dim, progress)
    if statistics.count != num_images:
        raise RuntimeError(f"merged the features of {statistics.count} images, expected {num_images}")
    features = None
    if subset is not None:
        index = np.concatenate([i for i, _ in kept]).astype(np.int64)
        order = np.argsort(index)
        features = FeatureSubset(index[order], np.concatenate([f.reshape(-1, dim) for _, f in kept])[order])
        if not np.array_equal(features.index, subset):
            raise RuntimeError(f"kept the features of {len(index)} subset images, expected {len(subset)}")
    path = reference_path(config)
    description = f"{source.name} split={evaluation.reference_split} images={num_images} shape={image_shape}"
    save_reference(path, statistics, identifier, description, features)
    logger.info("wrote %s", path)
    return ReferenceSummary(path, statistics.count, identifier, description, round(time.perf_counter() - started, 2))
