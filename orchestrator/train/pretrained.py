"""Model files a training run starts from: `train.initialize_from` (the student's first weights,
e.g. few-step training from a multi-step model) and `train.teacher` (the frozen network of a
distillation objective). Both are model files written by `train` (model.pt), local or s3://.

The driver checks them before any cluster work (orchestrator.job_checks): each is a model file,
and fits what the job says without its data (architecture for initial weights, transport for a
teacher). Each rank reads them again and checks the rest against the data it loaded (image shape,
class count): a backstop that also covers what only the data tells.
"""

from __future__ import annotations

import dataclasses

import torch

from orchestrator.config import JobConfig
from orchestrator.errors import JobError
from orchestrator.sample.model_files import read_model_file_at
from ucgm_core.dit import DiT, DiTSettings
from ucgm_core.model_file import ModelFileContents

# Settings that change how the network computes, not which weights it has.
_RUNTIME_ONLY_SETTINGS = ("attention",)

INITIALIZE_FROM, TEACHER = "train.initialize_from", "train.teacher"
_MISFIT = {INITIALIZE_FROM: "does not fit this job's network", TEACHER: "cannot teach this job"}


def model_sources(config: JobConfig) -> dict[str, str]:
    """The job's model-file keys that are set, e.g. {"train.teacher": "s3://b/teacher.pt"}."""
    keys = {INITIALIZE_FROM: config.train.initialize_from, TEACHER: config.train.teacher}
    return {key: path for key, path in keys.items() if path}


def misfit(key: str, path: str, source: ModelFileContents, config: JobConfig, data_shape: tuple[int, int, int] | None = None) -> str | None:
    """Why the model file at `path` (named by `key`) cannot serve this job, or None. Without
    `data_shape` (input_size, in_channels, num_classes) only what the config tells is compared."""
    if key == INITIALIZE_FROM:
        problems = _architecture_problems(source, config.model)
    elif source.transport != config.transport:
        problems = [f"it was trained on transport {source.transport!r}, this job uses {config.transport!r}"]
    else:
        problems = []
    if data_shape is not None:
        problems += _data_problems(source, *data_shape)
    return f"{key}: {path!r} {_MISFIT[key]}: {'; '.join(problems)}" if problems else None


def _read_fitting(key: str, path: str, config: JobConfig, data_shape: tuple[int, int, int]) -> ModelFileContents:
    _, source = read_model_file_at(key, path)
    problem = misfit(key, path, source, config, data_shape)
    if problem:
        raise JobError(problem)
    return source


def initialize_weights(model: DiT, config: JobConfig, *, input_size: int, in_channels: int, num_classes: int) -> None:
    """Copy `train.initialize_from`'s weights into `model` (before EMA and target copies are taken)."""
    source = _read_fitting(INITIALIZE_FROM, config.train.initialize_from, config, (input_size, in_channels, num_classes))
    model.load_state_dict(source.model.state_dict())


def load_teacher(config: JobConfig, device: torch.device, *, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """The frozen teacher of a distillation objective, on `device`."""
    source = _read_fitting(TEACHER, config.train.teacher, config, (input_size, in_channels, num_classes))
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
