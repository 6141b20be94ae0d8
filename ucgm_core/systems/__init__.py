"""The training systems: UCGM-T and the seed systems as configurations of one training interface
(ALGORITHMS.md sec. 3 and 5).

Every system is a frozen settings dataclass with a `kind` discriminator plus a small objective with
the `common.TrainingObjective` interface; its sampler is a UCGM-S `SamplerSettings` value. Each is
one record in the registry (`registry.py`), which the job schema, the presets and the builders
read. The training loop never branches on the system:

    objective = build_objective(settings, transport, teacher=teacher)     # teacher: distillation only
    ... objective(model, target_or_None, x, labels, generator=g, step=step) -> ObjectiveOutput

| kind           | settings class                  | objective                        | module       |
|----------------|---------------------------------|----------------------------------|--------------|
| "ucgm"         | ObjectiveSettings               | UnifiedObjective (UCGM-T)        | ucgm.py      |
| "scm"          | ContinuousConsistencySettings   | ContinuousConsistencyObjective   | scm.py       |
| "multistep_cm" | MultistepConsistencySettings    | MultistepConsistencyObjective    | multistep.py |
| "shortcut"     | ShortcutSettings                | ShortcutObjective                | shortcut.py  |
| "esc"          | ExplicitShortcutSettings        | ExplicitShortcutObjective        | esc.py       |

Named presets (transport, objective, sampler, network needs) are in `presets.py`.
"""

from __future__ import annotations

from ucgm_core.systems import esc, multistep, scm, shortcut, ucgm
from ucgm_core.systems.common import AdaptiveWeight, Network, ObjectiveOutput, TrainingObjective
from ucgm_core.systems.esc import ExplicitShortcutObjective, ExplicitShortcutSettings
from ucgm_core.systems.multistep import MultistepConsistencyObjective, MultistepConsistencySettings
from ucgm_core.systems.presets import PRESETS, SystemPreset, preset
from ucgm_core.systems.registry import (
    SYSTEMS,
    SystemRecord,
    SystemSettings,
    build_objective,
    needs_teacher,
    register,
    system,
    transport_problem,
)
from ucgm_core.systems.scm import ContinuousConsistencyObjective, ContinuousConsistencySettings
from ucgm_core.systems.shortcut import ShortcutObjective, ShortcutSettings
from ucgm_core.systems.ucgm import ObjectiveSettings, UnifiedObjective

# The seed systems, UCGM-T first (the job schema's default kind). A new system: its module and one line here.
register(ucgm.SYSTEM)
register(scm.SYSTEM)
register(multistep.SYSTEM)
register(shortcut.SYSTEM)
register(esc.SYSTEM)

__all__ = [
    "AdaptiveWeight",
    "ContinuousConsistencyObjective",
    "ContinuousConsistencySettings",
    "ExplicitShortcutObjective",
    "ExplicitShortcutSettings",
    "MultistepConsistencyObjective",
    "MultistepConsistencySettings",
    "Network",
    "ObjectiveOutput",
    "ObjectiveSettings",
    "PRESETS",
    "SYSTEMS",
    "ShortcutObjective",
    "ShortcutSettings",
    "SystemPreset",
    "SystemRecord",
    "SystemSettings",
    "TrainingObjective",
    "UnifiedObjective",
    "build_objective",
    "needs_teacher",
    "preset",
    "register",
    "system",
    "transport_problem",
]
