"""Range and choice checks for the systems' settings dataclasses: each error names the field, the
value it got and the fix, as the job schema reports it."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ucgm_core.transports import Transport

Network = Callable[..., torch.Tensor]


def require_transport(transport: Transport, allowed: tuple[str, ...], system: str) -> None:
    if transport.name not in allowed:
        raise ValueError(
            f"{system} is defined for the transport(s) {allowed}, got {transport.name!r}; "
            f"set transport: {allowed[0]} in the job"
        )


def check_fraction(obj: object, name: str, fix: str, *, closed_top: bool = True) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}; {fix}")
    if value < 0.0 or value > 1.0 or (not closed_top and value == 1.0):
        interval = "[0, 1]" if closed_top else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}; {fix}")


def check_nonnegative_int(obj: object, name: str, fix: str, *, minimum: int = 0) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}; {fix}")


def check_positive(obj: object, name: str, fix: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; {fix}")


def check_bool(obj: object, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ValueError(f"{name} must be true or false, got {getattr(obj, name)!r}")


def check_kind(obj: object, expected: str) -> None:
    if getattr(obj, "kind") != expected:
        raise ValueError(f"kind must be {expected!r} for {type(obj).__name__}, got {obj.kind!r}; leave kind at its default")


def check_choice(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(obj, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(obj, name)!r}")


def check_time_distribution(obj: object) -> None:
    value = getattr(obj, "time_distribution")
    if not hasattr(value, "sample"):
        raise ValueError(f"time_distribution must be a time distribution (e.g. BetaTime()), got {value!r}")


def check_teacher(distillation: bool, teacher: Network | None, system: str) -> None:
    """A teacher is required when distilling and refused otherwise."""
    if distillation and teacher is None:
        raise ValueError(
            f"{system} with distillation: true needs a teacher network: build_objective(settings, transport, "
            "teacher=load_model_file(path).model); or set distillation: false"
        )
    if not distillation and teacher is not None:
        raise ValueError(f"{system} got a teacher but distillation is false; set distillation: true or drop the teacher")


def refuse_teacher(teacher: Network | None, system: str, fix: str = "drop the teacher") -> None:
    """For systems that train from data alone."""
    if teacher is not None:
        raise ValueError(f"{system} trains without a teacher network; {fix}")
