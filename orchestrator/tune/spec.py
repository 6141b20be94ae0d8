"""The sweep spec of `python -m orchestrator tune`: a base job, a search space over its keys, the
metrics to minimise and how the search runs. Everything is checked, against the base job too,
before any trial starts.

    name: tune_digits
    job: digits.yaml                          # the base job, relative to this file
    job_overrides: {train.steps: 300, train.score_every: 50}
    mode: train                               # or sample: each trial scores `model_file` once
    metrics: [frechet_distance]               # + nfe or train_seconds: multi-objective
    num_trials: 6
    max_concurrent_trials: 2
    space:                                    # dotted job keys, suggested in this order
      train.learning_rate: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
      objective.consistency_ratio: {type: uniform, low: 0.0, high: 1.0}
      sampler.steps: {type: int, low: 2, high: 8}
      sampler.extrapolation: {type: uniform, low: 0.0, high: 0.5, when: "sampler.steps > 2"}
      sampler.schedule: {type: choice, values: [[1, 1, 1], [1.17, 0.8, 1.1]]}

A key may index into a list value (`sampler.boundary_gaps.1`). A parameter with `when:` is
suggested only when the condition on an earlier parameter holds; otherwise the job keeps the
base value (Optuna's define-by-run space, see orchestrator.tune.space).

Trials run in Tune's per-trial working directory, so the base job's relative paths (output_dir,
a relative `model_file=`, the default reference statistics under `outputs/`) are made absolute
here, on the driver, against the directory `tune` was started in.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import operator
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import storage
from orchestrator.config import RENAMED_KEYS, JobConfig, apply_override, flatten, migrate_renamed_keys, validate_job
from orchestrator.errors import ConfigError
from orchestrator.job_checks import check_outputs_outlive_the_job, resolve_locations
from orchestrator.tune.modes import METRICS, MODES, SweepMode, mode_of

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- conditions

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "not in": lambda value, options: value not in options,
    "in": lambda value, options: value in options,
}
_CONDITION = re.compile(r"^\s*([\w.]+)\s+(==|!=|<=|>=|<|>|not in|in)\s+(.+?)\s*$|^\s*([\w.]+)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class Condition:
    """`<key> <op> <value>`: key an earlier parameter, op one of == != < <= > >= in, not in."""

    key: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> Condition:
        match = _CONDITION.match(text)
        if not match:
            raise ValueError(f"condition {text!r} must read '<earlier key> <op> <value>' with op one of {', '.join(_OPERATORS)}, e.g. 'sampler.steps > 2'")
        key, op, value = (part for part in match.groups() if part is not None)
        return cls(key, op, yaml.safe_load(value))

    def holds(self, values: dict[str, Any]) -> bool:
        """False when the key was not suggested (its own condition failed)."""
        return self.key in values and bool(_OPERATORS[self.op](values[self.key], self.value))


# --------------------------------------------------------------------------- distributions


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Parameter(_Spec):
    when: str | None = Field(None, description="'<earlier key> <op> <value>': suggest this parameter only when it holds")

    @field_validator("when")
    @classmethod
    def _parses(cls, text: str | None) -> str | None:
        if text is not None:
            Condition.parse(text)
        return text

    @property
    def condition(self) -> Condition | None:
        return Condition.parse(self.when) if self.when else None


class _Range(_Parameter):
    @model_validator(mode="after")
    def _not_empty(self):
        if self.low >= self.high:
            raise ValueError(f"empty range: low={self.low} >= high={self.high}; make low smaller than high (fix a value with job_overrides instead)")
        return self

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class Uniform(_Range):
    type: Literal["uniform"]
    low: float
    high: float

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high)


class LogUniform(_Range):
    type: Literal["loguniform"]
    low: float
    high: float

    @model_validator(mode="before")
    @classmethod
    def _positive(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for bound in ("low", "high"):
                value = data.get(bound)
                if isinstance(value, (int, float)) and value <= 0:
                    raise ValueError(f"log-uniform needs positive bounds, got {bound}={value}; use a small positive low (e.g. 1e-5) or type: uniform")
        return data

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)


class IntRange(_Range):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _log_needs_positive(self):
        if self.log and self.low < 1:
            raise ValueError(f"a log-scaled int range needs low >= 1, got low={self.low}")
        return self

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


class Choice(_Parameter):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if len({_encode(v) for v in values}) != len(values):
            raise ValueError(f"values repeat: {values}; list each choice once")
        return values

    def suggest(self, trial: Any, name: str) -> Any:
        return self.decode(trial.suggest_categorical(name, [_encode(v) for v in self.values]))

    def decode(self, stored: Any) -> Any:
        """Optuna stores scalars only; lists and mappings travel as their JSON text."""
        return {_encode(v): v for v in self.values}[stored]

    def extremes(self) -> list[Any]:
        return list(self.values)


def _encode(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


Distribution = Annotated[Union[Uniform, LogUniform, IntRange, Choice], Field(discriminator="type")]
_DISTRIBUTIONS = {"uniform": Uniform, "loguniform": LogUniform, "int": IntRange, "choice": Choice}


# --------------------------------------------------------------------------- the spec


class EarlyStopping(_Spec):
    """ASHA on what training reports every train.score_every steps (train mode): the quick score,
    or the latest score of a checkpoint (evaluation.every, scored beside the training)."""

    enabled: bool = True
    metric: Literal["frechet_distance", "checkpoint_score"] = Field(
        "frechet_distance",
        description="frechet_distance: the quick score, by training step; checkpoint_score: the newest checkpoint's score "
        "(the sampler grid's first setting on evaluation.every_samples), by that checkpoint's step",
    )
    grace_period: int | None = Field(None, gt=0, description="steps a trial trains before it can be stopped; default train.score_every")
    reduction_factor: float = Field(2.0, gt=1, description="at each rung, the best 1/reduction_factor of the trials go on")


# Sweep keys renamed with the job keys they mirror (see orchestrator.config.RENAMED_KEYS).
RENAMED_SWEEP_KEYS = {"checkpoint": "model_file"}


class SweepConfig(_Spec):
    name: str = Field("sweep", min_length=1, description="sweep folder <output_dir>/<name>, Optuna study and MLflow parent run name")
    job: str = Field(..., description="base job spec (YAML), relative to the sweep file")
    job_overrides: dict[str, Any] = Field({}, description="dotted job keys fixed for every trial, e.g. {train.steps: 300}")
    mode: Literal[tuple(MODES)] = Field("train", description="train: every trial trains (Ray Train); sample: every trial evaluates `model_file`")
    model_file: str | None = Field(None, description="sample mode: the model file; default <base job run_dir>/model.pt")
    metrics: tuple[Literal[METRICS], ...] = Field(
        ("frechet_distance",), min_length=1, description="minimised; a second one makes the search multi-objective (Pareto front)"
    )
    num_trials: int = Field(..., gt=0, description="trials in all, including those of earlier runs of this sweep")
    max_concurrent_trials: int | None = Field(None, gt=0, description="cap; the cluster's resources per trial decide below it")
    driver_cpus: float = Field(1.0, gt=0, description="CPUs of each trial's driver (the Tune function that launches the trainer)")
    seed: int = Field(0, description="seed of the Optuna sampler: the same seed suggests the same configs")
    optuna_sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    early_stopping: EarlyStopping = EarlyStopping()
    storage: str | None = Field(None, description="Optuna storage: sqlite file path or RDB URL; default sqlite <sweep folder>/study.db")
    output_dir: str | None = Field(None, description="root of the sweep folder; default the base job's output_dir")
    space: dict[str, Distribution] = Field(..., min_length=1, description="dotted job key -> distribution")

    @field_validator("metrics")
    @classmethod
    def _frechet_first(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        if metrics[0] != "frechet_distance" or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must start with frechet_distance and not repeat, got {list(metrics)}; e.g. [frechet_distance, nfe]")
        return metrics

    @model_validator(mode="after")
    def _mode_fits(self) -> SweepConfig:
        problems = mode_of(self).spec_problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep: the spec, the base job (its YAML plus job_overrides, as raw keys and
    validated) and where everything goes."""

    config: SweepConfig
    base_raw: dict[str, Any]
    base_job: JobConfig
    folder: str
    storage_url: str

    @property
    def mode(self) -> SweepMode:
        return mode_of(self.config)

    def job_raw(self, params: dict[str, Any]) -> dict[str, Any]:
        """The base job's raw keys with `params` (dotted job keys) set."""
        raw = copy.deepcopy(self.base_raw)
        defaults = self.base_job.model_dump(mode="json")
        for key, value in params.items():
            set_job_value(raw, key, value, defaults)
        return raw


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep spec, apply overrides (`num_trials=4`, `job.train.steps=100`,
    `space.sampler.steps={type: int, low: 2, high: 6}`), validate it and its base job, and check
    every parameter against the job schema. Raises ConfigError listing every problem."""
    path = Path(path)
    raw = _read_mapping(path, "sweep spec")
    for override in overrides:
        _apply_sweep_override(raw, override)
    migrate_renamed_keys(raw, RENAMED_SWEEP_KEYS, "sweep spec")
    for section in ("job_overrides", "space"):
        _migrate_renamed_job_keys(raw, section)
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as error:
        problems = list(dict.fromkeys(_describe(e) for e in error.errors()))
        raise ConfigError("invalid sweep spec:\n  " + "\n  ".join(problems)) from None

    base_raw, base_job = _base_job(config, path.parent / config.job)  # an absolute `job` stays as it is
    folder = storage.absolute(storage.join(config.output_dir or base_job.output_dir, config.name))
    sweep = Sweep(config, base_raw, base_job, folder, _storage_url(config, folder))
    check_space(sweep)
    return sweep


def _base_job(config: SweepConfig, job_path: Path) -> tuple[dict[str, Any], JobConfig]:
    """The base job as raw keys and validated: its YAML, job_overrides and the job values the
    sweep's mode sets, with every relative local path made absolute in the raw keys too (the
    trials build their jobs from them, in another working directory)."""
    base_raw = migrate_renamed_keys(_read_mapping(job_path, "base job (sweep key `job`)"), what=f"base job {str(job_path)!r}")
    try:
        defaults = validate_job(copy.deepcopy(base_raw)).model_dump(mode="json")
    except ConfigError as error:
        raise ConfigError(f"the base job {str(job_path)!r} is invalid: {error}") from None
    problems = [problem for problem in (_unknown_key(key, defaults, "job_overrides") for key in config.job_overrides) if problem]
    if problems:
        raise ConfigError("invalid sweep spec:\n  " + "\n  ".join(problems))
    mode = mode_of(config)
    for key, value in {**config.job_overrides, **mode.job_values(config)}.items():
        set_job_value(base_raw, key, value, defaults)
    job = _with_overrides(base_raw, job_path)

    # inside `ray job submit` relative outputs would land in the job's temporary copy of the
    # working directory: refused there, before they are resolved (and so no longer look relative)
    sweep_root = job.model_copy(update={"output_dir": config.output_dir}) if config.output_dir else job
    check_outputs_outlive_the_job(sweep_root, mode.verb)
    given = flatten(job.model_dump(mode="json"))
    resolved = resolve_locations(job)  # against the directory `tune` runs in
    pinned = {key: value for key, value in flatten(resolved.model_dump(mode="json")).items() if given.get(key) != value}
    for key, value in {**pinned, **mode.fixed_inputs(resolved)}.items():
        set_job_value(base_raw, key, value, defaults)
    return base_raw, _with_overrides(base_raw, job_path)


def _with_overrides(base_raw: dict[str, Any], job_path: Path) -> JobConfig:
    try:
        return validate_job(copy.deepcopy(base_raw))
    except ConfigError as error:
        raise ConfigError(f"the base job {str(job_path)!r} with job_overrides is invalid: {error}") from None


def _migrate_renamed_job_keys(raw: dict[str, Any], section: str) -> None:
    """Dotted job keys of `job_overrides` or `space` under a name orchestrator.config.RENAMED_KEYS
    retired (`evaluation.checkpoint`) move to the new name, with the warning a job spec gets,
    before they are checked against the job; the order of the entries stays (it is the order
    the space is suggested in)."""
    entries = raw.get(section)
    if not isinstance(entries, dict):
        return
    migrated: dict[str, Any] = {}
    for key, value in entries.items():
        new = next((renamed + key[len(old) :] for old, renamed in RENAMED_KEYS.items() if key == old or key.startswith(old + ".")), key)
        if new != key:
            if new in entries:
                raise ConfigError(f"invalid sweep spec:\n  {section}.{key}: renamed to {new}, and both are set; keep only {new}")
            logger.warning("sweep spec: %s.%s is deprecated and will stop working in 0.3; rename it to %s.%s", section, key, section, new)
        migrated[new] = value
    raw[section] = migrated


def check_space(sweep: Sweep) -> None:
    """Every parameter names a job key, its conditions name earlier parameters, and each of its
    bounds (or choices), set alone on the base job, passes the job schema."""
    config, problems = sweep.config, []
    defaults = sweep.base_job.model_dump(mode="json")
    earlier: list[str] = []
    for key, distribution in config.space.items():
        unknown = _unknown_key(key, defaults, "space")
        if key.startswith("distributed."):
            unknown = f"space.{key}: a trial's resources are not searched (they decide how many trials run at once); fix them with job_overrides"
        if unknown:
            problems.append(unknown)
            earlier.append(key)
            continue
        default = _value_at(defaults, key)
        if isinstance(distribution, (Uniform, LogUniform)) and isinstance(default, int) and not isinstance(default, bool):
            problems.append(f"space.{key}: the job key holds an integer ({default!r}); use type: int")
        condition = distribution.condition
        if condition is not None and condition.key not in earlier:
            close = difflib.get_close_matches(condition.key, earlier, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"parameters before it: {earlier or 'none'}"
            problems.append(f"space.{key}.when: {condition.key!r} is not a parameter listed before {key!r}; {hint}")
        for value in distribution.extremes():
            try:
                validate_job(sweep.job_raw({key: value}))
            except ConfigError as error:
                reasons = str(error).split("\n", 1)[-1].strip().replace("\n  ", "; ")
                problems.append(f"space.{key}: the value {value!r} is rejected by the job schema ({reasons}); narrow the range")
        earlier.append(key)
    problems += sweep.mode.sweep_problems(sweep)
    if problems:
        raise ConfigError("invalid sweep spec:\n  " + "\n  ".join(problems))


def set_job_value(raw: dict[str, Any], key: str, value: Any, defaults: dict[str, Any]) -> None:
    """Set dotted `key` in a raw job tree, creating sections as needed; a numeric part indexes
    a list, copied from `defaults` (the resolved job) when the raw tree does not hold it yet."""
    parts = key.split(".")
    node: Any = raw
    default: Any = defaults
    for depth, part in enumerate(parts[:-1]):
        default = _child(default, part)
        following = parts[depth + 1]
        child = _child(node, part)
        if child is None or (following.isdigit() and not isinstance(child, list)):
            child = copy.deepcopy(default) if following.isdigit() else {}
            _assign(node, part, child)
        elif following.isdigit() and isinstance(child, tuple):
            child = list(child)
            _assign(node, part, child)
        node = child
    _assign(node, parts[-1], value)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _assign(node: Any, part: str, value: Any) -> None:
    if isinstance(node, list):
        node[int(part)] = value
    else:
        node[part] = value


def _unknown_key(key: str, defaults: dict[str, Any], section: str) -> str | None:
    """A message when `key` is not a key of the resolved job (with the closest one), else None."""
    node: Any = defaults
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            close = difflib.get_close_matches(key, _job_keys(defaults), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "keys look like train.learning_rate or sampler.steps"
            return f"{section}.{key}: not a key of the job; {hint}"
    return None


def _value_at(defaults: dict[str, Any], key: str) -> Any:
    node: Any = defaults
    for part in key.split("."):
        node = _child(node, part)
    return node


def _job_keys(defaults: dict[str, Any]) -> list[str]:
    keys = list(flatten(defaults))
    for key, value in flatten(defaults).items():
        if isinstance(value, list):
            keys += [f"{key}.{index}" for index in range(len(value))]
    return keys


def _storage_url(config: SweepConfig, folder: str) -> str:
    if config.storage is None:
        if "://" in folder:
            raise ConfigError(
                f"invalid sweep spec:\n  storage: the sweep folder {folder!r} is not local and SQLite needs a local file; "
                "set storage: to a local path or an RDB URL (postgresql://...)"
            )
        return f"sqlite:///{os.path.join(folder, 'study.db')}"
    if "://" in config.storage:
        return config.storage
    return f"sqlite:///{os.path.abspath(config.storage)}"


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found; pass the path of a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r} must be a mapping of keys")
    return raw


def _apply_sweep_override(raw: dict[str, Any], override: str) -> None:
    """`job.<dotted job key>=v` and `space.<dotted job key>=v` address one entry of those
    mappings (their keys hold dots themselves); anything else is a dotted sweep key."""
    key, sep, text = override.partition("=")
    for section, target in (("job.", "job_overrides"), ("space.", "space")):
        if sep and key.startswith(section) and len(key) > len(section):
            entries = raw.setdefault(target, {})
            if not isinstance(entries, dict):
                raise ConfigError(f"override {override!r}: {target} must be a mapping")
            entries[key[len(section) :]] = yaml.safe_load(text) if text else None
            return
    apply_override(raw, override)


def _describe(error: dict[str, Any]) -> str:
    location = list(error["loc"])
    member = None
    if location[:1] == ["space"] and len(location) > 2 and location[2] in _DISTRIBUTIONS:
        member = _DISTRIBUTIONS[location.pop(2)]
    key = ".".join(str(part) for part in location) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = list(member.model_fields) if member else list(_fields_at(location[:-1]))
        close = difflib.get_close_matches(str(location[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{key}: unknown key; {hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = error.get("ctx", {}).get("tag")
        close = difflib.get_close_matches(str(given), list(_DISTRIBUTIONS), n=1) if given else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{key}.type: {'unknown type ' + repr(given) + '; ' if given else 'missing; '}{hint}choose one of {list(_DISTRIBUTIONS)}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        # a whole-spec check (`_mode_fits`) has no location; its messages name their keys
        return f"{key}: {message}" if location else message
    return f"{key}: {message} (got {error.get('input')!r})"


def _fields_at(location: list[Any]) -> list[str]:
    model: Any = SweepConfig
    for part in location:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
