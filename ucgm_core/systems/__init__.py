"""The seed systems as configurations of one training interface (ALGORITHMS.md sec. 5).

Every system is a frozen settings dataclass with a `kind` discriminator plus a small objective with
UnifiedObjective's call signature (`common.TrainingObjective`); its sampler is a UCGM-S
`SamplerSettings` value. The training loop never branches on the system:

    objective = build_objective(settings, transport, teacher=teacher)     # teacher: distillation only
    ... objective(model, target_or_None, x, labels, generator=g, step=step) -> ObjectiveOutput

| kind           | settings class                  | objective                        | module       |
|----------------|---------------------------------|----------------------------------|--------------|
| (UCGM-T)       | ObjectiveSettings               | UnifiedObjective                 | objective.py |
| "scm"          | ContinuousConsistencySettings   | ContinuousConsistencyObjective   | scm.py       |
| "multistep_cm" | MultistepConsistencySettings    | MultistepConsistencyObjective    | multistep.py |
| "shortcut"     | ShortcutSettings                | ShortcutObjective                | shortcut.py  |
| "esc"          | ExplicitShortcutSettings        | ExplicitShortcutObjective        | esc.py       |

Named presets (transport, objective, sampler, network needs) are in `presets.py`.
"""

from __future__ import annotations

from typing import Callable, Union

from ucgm_core.objective import ObjectiveSettings, UnifiedObjective
from ucgm_core.transports import Transport

from ucgm_core.systems import esc, scm
from ucgm_core.systems.common import AdaptiveWeight, Network, TrainingObjective
from ucgm_core.systems.esc import ExplicitShortcutObjective, ExplicitShortcutSettings
from ucgm_core.systems.multistep import MultistepConsistencyObjective, MultistepConsistencySettings
from ucgm_core.systems.scm import ContinuousConsistencyObjective, ContinuousConsistencySettings
from ucgm_core.systems.shortcut import ShortcutObjective, ShortcutSettings
from ucgm_core.systems.presets import PRESETS, SystemPreset, preset

SystemSettings = Union[
    ContinuousConsistencySettings, MultistepConsistencySettings, ShortcutSettings, ExplicitShortcutSettings
]

SYSTEM_SETTINGS: dict[str, type] = {
    "scm": ContinuousConsistencySettings,
    "multistep_cm": MultistepConsistencySettings,
    "shortcut": ShortcutSettings,
    "esc": ExplicitShortcutSettings,
}

_OBJECTIVES: dict[str, Callable[..., TrainingObjective]] = {
    "scm": ContinuousConsistencyObjective,
    "multistep_cm": MultistepConsistencyObjective,
    "shortcut": ShortcutObjective,
    "esc": ExplicitShortcutObjective,
}


# Systems defined for particular transports only; the others take any transport.
_TRANSPORTS: dict[str, tuple[str, ...]] = {"scm": scm.TRANSPORTS, "esc": esc.TRANSPORTS}


def transport_problem(settings: ObjectiveSettings | SystemSettings, transport_name: str) -> str | None:
    """Why `transport_name` does not fit the system, or None (checked before a job starts)."""
    allowed = _TRANSPORTS.get(settings.kind)
    if allowed is None or transport_name in allowed:
        return None
    return f"{settings.kind} is defined for the transport(s) {list(allowed)}, got {transport_name!r}; set transport: {allowed[0]}"


def needs_teacher(settings: ObjectiveSettings | SystemSettings) -> bool:
    """Distillation modes train against a frozen teacher network."""
    return getattr(settings, "mode", "training") == "distillation"


def build_objective(
    settings: ObjectiveSettings | SystemSettings, transport: Transport, *, teacher: Network | None = None
) -> TrainingObjective:
    """UnifiedObjective for ObjectiveSettings, else the objective of `settings.kind`.

    teacher: a frozen network of the same transport (e.g. `load_model_file(path).model`), required by
    the distillation modes (sCD, Multistep CD) and refused elsewhere."""
    if isinstance(settings, ObjectiveSettings):
        if teacher is not None:
            raise ValueError("UCGM-T takes no teacher; few-step training starts from the checkpoint instead")
        return UnifiedObjective(transport, settings)
    kind = getattr(settings, "kind", None)
    if kind not in _OBJECTIVES:
        raise ValueError(f"unknown system settings {settings!r}; use ObjectiveSettings or one of kinds {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[kind](transport, settings, teacher=teacher)


__all__ = [
    "AdaptiveWeight",
    "ContinuousConsistencyObjective",
    "ContinuousConsistencySettings",
    "ExplicitShortcutObjective",
    "ExplicitShortcutSettings",
    "MultistepConsistencyObjective",
    "MultistepConsistencySettings",
    "PRESETS",
    "SYSTEM_SETTINGS",
    "ShortcutObjective",
    "ShortcutSettings",
    "SystemPreset",
    "SystemSettings",
    "TrainingObjective",
    "build_objective",
    "needs_teacher",
    "preset",
    "transport_problem",
]
