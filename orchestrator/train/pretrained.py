"""Model files a training run starts from: `train.initialize_from` (the student's first weights,
e.g. few-step training from a multi-step model) and `train.teacher` (the frozen network of a
distillation objective). Both are model files written by `train` (model.pt), local or s3://.

The driver checks that they exist before any cluster work; each rank reads them and refuses a file
that does not fit the job (another architecture, data shape, class count or transport).
"""

from __future__ import annotations

import dataclasses
import io

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import JobError
from ucgm_core.dit import DiT, DiTSettings
from ucgm_core.model_file import ModelFileContents, load_model_file

# Settings that change how the network computes, not which weights it has.
_RUNTIME_ONLY_SETTINGS = ("attention",)


def model_sources(config: JobConfig) -> dict[str, str]:
    """The job's model-file keys that are set, e.g. {"train.teacher": "s3://b/teacher.pt"}."""
    keys = {"train.initialize_from": config.train.initialize_from, "train.teacher": config.train.teacher}
    return {key: path for key, path in keys.items() if path}


def check_model_sources(config: JobConfig) -> None:
    for key, path in model_sources(config).items():
        if not storage.exists(path):
            raise FileNotFoundError(
                f"{key}: no model file at {path!r}; point it at a model.pt written by `python -m orchestrator train` (local path or s3://)"
            )


def read_model_source(key: str, path: str) -> ModelFileContents:
    try:
        return load_model_file(io.BytesIO(storage.read_bytes(path)))
    except (ValueError, RuntimeError, KeyError) as error:
        raise JobError(f"{key}: {path!r} is not a usable model file: {error}") from None


def initialize_weights(model: DiT, config: JobConfig, *, input_size: int, in_channels: int, num_classes: int) -> None:
    """Copy `train.initialize_from`'s weights into `model` (before EMA and target copies are taken)."""
    path = config.train.initialize_from
    source = read_model_source("train.initialize_from", path)
    problems = _architecture_problems(source, config.model) + _data_problems(source, input_size, in_channels, num_classes)
    if problems:
        raise JobError(f"train.initialize_from: {path!r} does not fit this job's network: {'; '.join(problems)}")
    model.load_state_dict(source.model.state_dict())


def load_teacher(config: JobConfig, device: torch.device, *, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """The frozen teacher of a distillation objective, on `device`."""
    path = config.train.teacher
    source = read_model_source("train.teacher", path)
    problems = [] if source.transport == config.transport else [f"it was trained on transport {source.transport!r}, this job uses {config.transport!r}"]
    problems += _data_problems(source, input_size, in_channels, num_classes)
    if problems:
        raise JobError(f"train.teacher: {path!r} cannot teach this job: {'; '.join(problems)}")
    return source.model.to(device).eval().requires_grad_(False)


def _architecture_problems(source: ModelFileContents, settings: DiTSettings) -> list[str]:
    given, wanted = dataclasses.asdict(source.model.settings), dataclasses.asdict(settings)
    return [
        f"model.{name} is {given.get(name)!r} there, {wanted[name]!r} here"
        for name in wanted
        if name not in _RUNTIME_ONLY_SETTINGS and given.get(name) != wanted[name]
    ]


def _data_problems(source: ModelFileContents, input_size: int, in_channels: int, num_classes: int) -> list[str]:
    if (source.input_size, source.in_channels, source.num_classes) == (input_size, in_channels, num_classes):
        return []
    return [
        f"it was trained on {source.in_channels}x{source.input_size}x{source.input_size} images of {source.num_classes} classes, "
        f"this job's data is {in_channels}x{input_size}x{input_size} of {num_classes}"
    ]
