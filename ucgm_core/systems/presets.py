"""Named presets of the systems: transport, objective settings, sampler settings and what the
network and the loop must provide (read from the system's registry record). The objective settings
are UCGM-T `ObjectiveSettings` (UCGM's own recipes) or one of the seed systems' settings classes;
`build_objective` takes any of them.

| name                  | transport | objective                        | sampler (NFE)               | needs                       |
|-----------------------|-----------|----------------------------------|-----------------------------|-----------------------------|
| ucgm_multi_step       | linear    | UCGM-T lambda 0, enhanced 0.44   | UCGM-S 40, kappa 0.54       |                             |
| ucgm_few_step         | linear    | UCGM-T lambda 1, frozen, zeta 2  | UCGM-S 2, rho 1             | init from ucgm_multi_step   |
| ucgm_accelerated      | linear    | (pretrained multi-step model)    | UCGM-S 16, kappa 0.4        | a multi-step checkpoint     |
| sct / scd             | trigflow  | sCM training / distillation      | 2 (1.1 rad re-noise)        | forward AD; scd a teacher   |
| multistep_ct / _cd    | vp_cosine | Multistep CM, T = 8              | 8 DDIM steps                | _cd a teacher               |
| shortcut              | relinear  | shortcut models, M = 128         | 1 (any K <= 128)            | two-time network            |
| esc                   | linear    | ESC (MeanFlow + plug-in, ...)    | 1                           | two-time net, forward AD    |

Teachers (scd, multistep_cd) are multi-step models of the same transport, e.g. trained with
UCGM-T lambda = 0 on `trigflow` / `vp_cosine`. "forward AD" means the network must support
torch.func.jvp (DiT: settings.attention = "math"); "two-time network" DiTSettings(two_time=True).

Reference recipes are for ImageNet-scale runs; the numbers (steps, EMA, warm-ups, annealing
horizons) are meant to be scaled down for small benchmarks by `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ucgm_core.sampler import SamplerSettings
from ucgm_core.time_distributions import BetaTime

from ucgm_core.systems import esc, multistep, scm, shortcut, ucgm
from ucgm_core.systems.registry import SystemRecord, SystemSettings
from ucgm_core.systems.ucgm import ObjectiveSettings

# UCGM-T reference multi-step recipe (ALGORITHMS.md sec. 3; UCGM configs/training_multi_steps).
UCGM_MULTI_STEP = ObjectiveSettings(
    time_distribution=BetaTime(a=2.4, b=2.4, scale=1.0),
    consistency_ratio=0.0,
    target_network="ema",
    target_ema_decay=0.999,
    enhanced_ratio=0.44,
    enhanced_style="live_vs_unconditional",
    label_dropout=0.1,
    loss_constant=0.0,
    cosine_loss=True,
    time_weighting="cosine",
)

# UCGM-T reference few-step recipe (configs/training_few_steps): start from a multi-step checkpoint.
UCGM_FEW_STEP = ObjectiveSettings(
    time_distribution=BetaTime(a=0.8, b=1.0, scale=1.0),
    consistency_ratio=1.0,
    derivative="finite_difference",
    target_network="frozen",
    enhanced_ratio=2.0,
    enhanced_style="target_vs_data",
    enhanced_range=(0.0, 0.75),
    label_dropout=0.1,
    loss_constant=5.0,
    cosine_loss=False,
    time_weighting="cosine",
)

# UCGM-S on multi-step models (configs/sampling_multi_steps): Kumaraswamy grid and extrapolation.
UCGM_MULTI_STEP_SAMPLER = SamplerSettings(
    steps=40, schedule=(1.2, 0.72, 1.2), boundary_gaps=(0.001, 0.002), extrapolation=0.54
)
# Fewer steps on a pretrained multi-step model (UCGM-S "acceleration"): UCGM's recommended grid.
UCGM_ACCELERATED_SAMPLER = SamplerSettings(
    steps=16, schedule=(1.17, 0.8, 1.1), boundary_gaps=(0.001, 0.002), extrapolation=0.4
)
# UCGM-S on few-step models (configs/training_few_steps `sample`): re-noise each step.
UCGM_FEW_STEP_SAMPLER = SamplerSettings(steps=2, boundary_gaps=(0.001, 0.3), stochasticity=1.0)


@dataclass(frozen=True)
class SystemPreset:
    """Everything a job needs to train and sample one system.

    initialization: "scratch", or "multi_step_checkpoint" (start the student from a multi-step
        model's weights; UCGM few-step), or "pretrained" (no training: sample a trained model).
    teacher: a frozen multi-step model of the same transport is passed as `teacher=`.
    two_time_network / forward_mode_autodiff: what the network must support (DiT: two_time=True,
        attention="math").
    """

    name: str
    transport: str
    objective: SystemSettings
    sampler: SamplerSettings
    initialization: Literal["scratch", "multi_step_checkpoint", "pretrained"] = "scratch"
    teacher: bool = False
    two_time_network: bool = False
    forward_mode_autodiff: bool = False


def _preset(
    name: str,
    record: SystemRecord,
    objective: SystemSettings,
    sampler: SamplerSettings,
    initialization: Literal["scratch", "multi_step_checkpoint", "pretrained"] = "scratch",
) -> SystemPreset:
    """The preset of `objective` on its system's default transport, with the record's needs (the
    record itself, not the registry: presets are built while the package registers its systems)."""
    return SystemPreset(
        name=name,
        transport=record.default_transport,
        objective=objective,
        sampler=sampler,
        teacher=record.needs_teacher(objective),
        two_time_network=record.two_time_network,
        forward_mode_autodiff=record.forward_mode_autodiff(objective),
        initialization=initialization,
    )


def _presets() -> dict[str, SystemPreset]:
    multistep_ct = multistep.MultistepConsistencySettings()
    multistep_sampler = multistep.sampler_settings(multistep_ct.student_steps)
    presets = [
        _preset("ucgm_multi_step", ucgm.SYSTEM, UCGM_MULTI_STEP, UCGM_MULTI_STEP_SAMPLER),
        _preset(
            "ucgm_few_step", ucgm.SYSTEM, UCGM_FEW_STEP, UCGM_FEW_STEP_SAMPLER, initialization="multi_step_checkpoint"
        ),
        _preset(
            "ucgm_accelerated", ucgm.SYSTEM, UCGM_MULTI_STEP, UCGM_ACCELERATED_SAMPLER, initialization="pretrained"
        ),
        _preset("sct", scm.SYSTEM, scm.ContinuousConsistencySettings(), scm.sampler_settings(2)),
        _preset("scd", scm.SYSTEM, scm.ContinuousConsistencySettings(distillation=True), scm.sampler_settings(2)),
        _preset("multistep_ct", multistep.SYSTEM, multistep_ct, multistep_sampler),
        _preset(
            "multistep_cd",
            multistep.SYSTEM,
            multistep.MultistepConsistencySettings(distillation=True),
            multistep_sampler,
        ),
        _preset("shortcut", shortcut.SYSTEM, shortcut.ShortcutSettings(), shortcut.sampler_settings(1)),
        _preset("esc", esc.SYSTEM, esc.ExplicitShortcutSettings(), esc.sampler_settings(1)),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, SystemPreset] = _presets()


def preset(name: str) -> SystemPreset:
    """The preset called `name` (see the module table)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown system preset {name!r}; choose one of {sorted(PRESETS)}") from None
