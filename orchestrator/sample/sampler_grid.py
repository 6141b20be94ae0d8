"""The grid of sampler settings one `evaluate` scores from the same noise (`evaluation.sampler_grid`:
overrides on top of the job's sampler section), and their short names."""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from ucgm_core.sampler import SamplerSettings


def grid_settings(config: JobConfig) -> list[SamplerSettings]:
    """The sampler settings to score: the sampler section with each sweep entry applied (or the
    sampler section alone when there is no sweep)."""
    base = dataclasses.asdict(config.sampler)
    settings = []
    for index, override in enumerate(config.evaluation.sampler_grid or ({},)):
        try:
            settings.append(SamplerSettings(**{**base, **override}))
        except (TypeError, ValueError) as error:
            raise ConfigError.of_job([f"evaluation.sampler_grid: entry {index} on top of the sampler section: {error}"]) from None
    return settings


def describe_settings(settings: SamplerSettings, base: SamplerSettings) -> str:
    """A short name of a setting: the fields that differ from `base` (e.g. "steps_4-extrapolation_0.3"),
    usable as an MLflow metric-name suffix."""
    changed = [
        f"{field.name}_{_compact(getattr(settings, field.name))}"
        for field in dataclasses.fields(SamplerSettings)
        if getattr(settings, field.name) != getattr(base, field.name) or field.name == "steps"
    ]
    return "-".join(changed)


def _compact(value: Any) -> str:
    if isinstance(value, tuple):
        return "_".join(_compact(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
