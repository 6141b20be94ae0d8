"""sCM: simplified and stabilised continuous-time consistency models (Lu & Song 2024, arXiv 2410.11081).

TrigFlow in our time: with the angle theta = (pi/2) t, x_t = sin(theta) z + cos(theta) x and the network
predicts F ~ dx_t/dtheta = cos(theta) z - sin(theta) x; its consistency function is
f(x_t, theta) = cos(theta) x_t - sin(theta) F (the transport's x_hat). Data are taken to be normalised
to unit variance (sCM's sigma_d = 1 in these units; the dataset, not the objective, scales them).

One step (the paper's Algorithm 1):

    v     = dx_t/dtheta:  cos(theta) z - sin(theta) x            (sCT, consistency training)
                          F_teacher(x_t, t)                      (sCD, distillation from a TrigFlow model)
    (F-, dF-/dtheta) = JVP of theta- (here the live weights under stop-gradient, as in the paper)
                       along (dx/dtheta, dt/dtheta) = (v, 2/pi)
    g     = -cos^2(theta) (F- - v) - r cos(theta) sin(theta) (x_t + dF-/dtheta)      r: tangent warm-up
    g     <- g / (||g|| + c)                                                        tangent normalisation
    loss  = exp(-w(t)) mean((F - F- - g)^2) + w(t)                                  learned weighting

With r = 1, g = cos(theta) df-/dtheta along the trajectory, so F is pushed to make f constant along
it; cos(theta) is sCM's prior weighting 1/tan(theta) times sin(theta), already folded in.
r = min(1, step / tangent_warmup_steps) (sec. 4.2, "tangent warmup"; step None = warmed up).

Choices where the paper leaves details open:
- ||g|| is the per-sample root mean square over the D data dimensions (the L2 norm / sqrt(D)), so the
  constant c = 0.1 means the same for a 2-D toy and an image.
- w(t) is `AdaptiveWeight` (Fourier features of t and one linear layer, zero-initialised); the paper
  uses an MLP on the network's time embedding.
- the derivative is the total derivative through `network_time` (identity for TrigFlow).

Sampling (sec. 4, "sampling"): one step from t = 1 (theta = pi/2), or two steps re-noised at
theta_mid = 1.1 rad: UCGM-S with stochasticity 1 and boundary_gaps (0, 1.1 / (pi/2)) (`sampler_settings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal

import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.sampler import SamplerSettings
from ucgm_core.time_distributions import ArctanLogNormalTime, TimeDistribution
from ucgm_core.transports import Transport, broadcast_time

from ucgm_core.systems.checks import (
    check_bool,
    check_fraction,
    check_kind,
    check_nonnegative_int,
    check_positive,
    check_teacher,
    check_time_distribution,
    require_transport,
)
from ucgm_core.systems.common import (
    AdaptiveWeight,
    Network,
    ObjectiveOutput,
    RandomStateReplay,
    adaptively_weighted,
    draw_time,
    forward_derivative,
    noised_batch,
    per_sample_mean_square,
    per_sample_rms,
    warmup_ratio,
)
from ucgm_core.systems.registry import SystemRecord, SystemSettings, always

Tensor = torch.Tensor

_HALF_PI = math.pi / 2
# sCM's two-step sampler re-noises at this TrigFlow angle (radians).
MIDDLE_ANGLE = 1.1
TRANSPORTS = ("trigflow",)


@dataclass(frozen=True)
class ContinuousConsistencySettings(SystemSettings):
    """sCM settings, sCT or (distillation: true) sCD; defaults are the paper's ImageNet ones.

    time_distribution: tan(theta) sigma_d lognormal, (mean, std) = (-1.0, 1.6) ImageNet, (-1.0, 1.4) CIFAR-10.
    tangent_normalization: c in g / (||g|| + c); 0 disables the normalisation.
    tangent_warmup_steps: r = min(1, step / this); 0 disables the warm-up.
    adaptive_weighting: learn w(t) (an extra module the optimiser must train).
    label_dropout: fraction of rows given the null label (0: sCM trains without it).
    """

    kind: Literal["scm"] = "scm"
    distillation: bool = False
    time_distribution: TimeDistribution = field(default_factory=lambda: ArctanLogNormalTime(mean=-1.0, std=1.6))
    tangent_normalization: float = 0.1
    tangent_warmup_steps: int = 10_000
    adaptive_weighting: bool = True
    adaptive_weight_frequencies: int = 16
    label_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_kind(self, "scm")
        check_bool(self, "distillation")
        check_time_distribution(self)
        if self.tangent_normalization != 0:
            check_positive(self, "tangent_normalization", "sCM uses 0.1 (0 disables the normalisation)")
        check_nonnegative_int(self, "tangent_warmup_steps", "sCM uses 10000 (0 disables the warm-up)")
        check_nonnegative_int(self, "adaptive_weight_frequencies", "use 16", minimum=1)
        check_bool(self, "adaptive_weighting")
        check_fraction(self, "label_dropout", "use 0 (sCM) or 0.1 for classifier-free guidance", closed_top=False)


def trigflow_tangent(
    network: Network,
    transport: Transport,
    x_time: Tensor,
    time: Tensor,
    velocity: Tensor,
    labels: Tensor,
    *,
    warmup: float = 1.0,
    random_state: RandomStateReplay | None = None,
) -> tuple[Tensor, Tensor]:
    """(F-, g) with g = -cos^2(theta) (F- - v) - warmup cos(theta) sin(theta) (x_t + dF-/dtheta), unnormalised.

    `velocity` v = dx_t/dtheta; dF-/dtheta is the JVP of network(x, network_time(t), labels) along
    (v, dt/dtheta = 2/pi). Evaluate under torch.no_grad for a stop-gradient target."""

    def output(x: Tensor, t: Tensor) -> Tensor:
        return network(x, transport.network_time(t), labels)

    direction = (velocity, torch.full_like(time, 1.0 / _HALF_PI))
    output_minus, derivative = forward_derivative(output, (x_time, time), direction, random_state)
    angle = _HALF_PI * broadcast_time(time, x_time)
    cos, sin = torch.cos(angle), torch.sin(angle)
    tangent = -(cos**2) * (output_minus - velocity) - warmup * cos * sin * (x_time + derivative)
    return output_minus, tangent


def normalize_tangent(tangent: Tensor, constant: float) -> Tensor:
    """g / (rms(g) + c) per sample (unchanged when c = 0)."""
    if constant == 0:
        return tangent
    return tangent / (per_sample_rms(tangent) + constant)


class ContinuousConsistencyObjective:
    """sCT / sCD as a training objective (see the module docstring and `TrainingObjective`)."""

    def __init__(
        self, transport: Transport, settings: ContinuousConsistencySettings | None = None, *, teacher: Network | None = None
    ) -> None:
        self.settings = settings if settings is not None else ContinuousConsistencySettings()
        require_transport(transport, TRANSPORTS, "sCM")
        check_teacher(self.settings.distillation, teacher, "sCM")
        self.transport = transport
        self.teacher = teacher
        self.weight = (
            AdaptiveWeight(times=1, frequencies=self.settings.adaptive_weight_frequencies)
            if self.settings.adaptive_weighting
            else None
        )

    needs_target_network = False  # theta- is the live network under stop-gradient

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        return TargetNetwork.create("live", model)

    def extra_modules(self) -> list[nn.Module]:
        """[w(t)] when adaptive_weighting: the loop must train (and checkpoint) its parameters."""
        return [self.weight] if self.weight is not None else []

    def __call__(
        self,
        network: Network,
        target_network: Network | None,
        x: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator,
        num_classes: int | None = None,
        step: int | None = None,
    ) -> ObjectiveOutput:
        settings, transport = self.settings, self.transport
        time = draw_time(settings.time_distribution, x, generator)
        batch = noised_batch(
            transport, x, labels, time,
            generator=generator, null_label=null_label_of(network, num_classes), label_dropout=settings.label_dropout,
        )
        x_time, dropped = batch.x_time, batch.labels
        random_state = RandomStateReplay(x.device)
        output = network(x_time, transport.network_time(time), dropped)

        ratio = warmup_ratio(step, settings.tangent_warmup_steps)
        with torch.no_grad():
            if settings.distillation:
                velocity = self.teacher(x_time, transport.network_time(time), dropped)
            else:
                velocity = transport.ideal_output(x, batch.noise, time)
            output_minus, tangent = trigflow_tangent(
                network, transport, x_time, time, velocity.to(x_time.dtype), dropped,
                warmup=ratio, random_state=random_state,
            )
            tangent = normalize_tangent(tangent, settings.tangent_normalization)

        residual = output - output_minus.detach() - tangent
        losses = adaptively_weighted(per_sample_mean_square(residual), self.weight, time)
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "mse_to_target": per_sample_mean_square(residual.detach()).mean(),
            "tangent_rms": per_sample_mean_square(tangent).sqrt().mean(),
            "tangent_warmup": torch.tensor(ratio),
            "mean_time": time.mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)


def sampler_settings(steps: int = 2) -> SamplerSettings:
    """sCM's sampler as UCGM-S: 1 step from t = 1, or 2 steps re-noised at theta = 1.1 rad
    (x = cos(theta) x_hat + sin(theta) eps, fresh eps), on the trigflow transport."""
    if steps not in (1, 2):
        raise ValueError(f"sCM samples with 1 or 2 steps, got {steps}")
    middle = MIDDLE_ANGLE / _HALF_PI
    # one step never re-noises; stochasticity 0 there spares the caller a generator
    return SamplerSettings(steps=steps, boundary_gaps=(0.0, middle), stochasticity=1.0 if steps == 2 else 0.0)


SYSTEM = SystemRecord(
    kind="scm",
    settings=ContinuousConsistencySettings,
    objective=ContinuousConsistencyObjective,
    default_transport="trigflow",
    transports=TRANSPORTS,
    forward_mode_autodiff=always,
    needs_teacher=attrgetter("distillation"),
)
