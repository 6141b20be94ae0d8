"""UCGM-T: the unified training objective (ALGORITHMS.md section 3), registered as kind "ucgm".

One batch (x, labels) is trained as follows (t = 0 data, t = 1 noise):

1. Label dropout: the last round(p B) rows get the null label `num_classes` (none when that
   rounds to 0; the reference's `c[-0:]` would drop all). The caller's tensor is not modified.
2. Draw t ~ time distribution, then z ~ N(0, I), both from the caller's generator;
   x_t = alpha(t) z + gamma(t) x and F_t = F_theta(x_t, network_time(t), labels).
3. The regression target, computed without gradient:

   - consistency_ratio lambda = 0 (multi-step): target = F* = alpha_hat z_tar + gamma_hat x_tar,
     where (x_tar, z_tar) = (x, z), or the enhanced pair below.
   - lambda in (0, 1) (discrete consistency): with eps = t - lambda t,
     d = (x_hat(t) - x_hat_theta-(lambda t)) / eps, where x_hat(t) converts the detached F_t.
   - lambda = 1 (continuous consistency): d = d/dt x_hat_theta-(t) along the path
     x_t(t) = alpha(t) z + gamma(t) x, a total derivative (it includes the dependence through
     `network_time`), by a central finite difference or a forward-mode JVP.
   - for lambda > 0: d <- clamp(d, -1, 1), target = stopgrad(F_t) - (alpha/den)(4/sin(pi t/2)) d.

   x_hat_theta-(r) = (F_theta-(x_r, network_time(r), labels) alpha(r) - y_r alpha_hat(r)) / den(r)
   with the network input x_r = alpha(r) z + gamma(r) x and the conversion point
   y_r = alpha(r) z_tar + gamma(r) x_tar. Without enhancement y_r = x_r. With it the network is
   fed the true pair and only the conversion uses the enhanced pair.
   Which weights x_hat_theta- is evaluated with (for every lambda > 0) is `derivative_network`:
   "live" (the default) evaluates the online weights under stop-gradient, as the reference code
   and sCM do; "target" evaluates theta-, the paper's literal reading. With a frozen theta-
   (few-step training from a multi-step checkpoint) "target" is unstable: d never changes, so
   every step pushes F the same way and the output grows without bound (seen on the 8-Gaussians
   toy); theta- then serves the enhanced target only, as in the reference.
4. Loss per sample: sqrt(mean((F_t - target)^2) + c^2) - c, plus mean(1 - cos(F_t, target)) over
   the channel axis (dim 1) when `cosine_loss`, times cos(pi t / 2) when time_weighting is
   "cosine"; the loss is the batch mean. With c = 0 this is a per-sample RMSE, not an MSE.

Enhanced target (training-time guidance, zeta = enhanced_ratio > 0). With a conditional
prediction (x_c, z_c) and a guide prediction (x_g, z_g), each of x_tar, z_tar is

    rows kept, t strictly inside enhanced_range:  truth + zeta (cond - guide)
    rows kept, t outside the range:              (truth + cond) / 2
    rows with a dropped label:                   (truth + guide) / 2

| enhanced_style            | reference name | cond                              | guide                   |
|---------------------------|----------------|-----------------------------------|-------------------------|
| "live_vs_unconditional"   | ft-vs-fe       | live F_t (detached), its labels   | theta-, null labels     |
| "target_vs_unconditional" | fc-vs-fe       | theta-, the (dropped) labels      | theta-, null labels     |
| "target_vs_data"          | fc-vs-xz       | theta-, the (dropped) labels      | the true pair (x, z)    |

With "target_vs_data" the dropped rows therefore keep the true pair, as in the reference.

Every extra forward pass (target network, finite-difference points, JVP) replays the RNG state
from just before the online forward pass, so in-model dropout draws the same masks; the global
RNG is left where the online pass left it.

Where we differ from the reference code (LINs-lab/UCGM `methods/unigen.py`, compared in float64):

- The consistency derivative goes through the live weights under stop-gradient by default
  (`derivative_network: "live"`), not through the target network theta-, because the reference
  evaluates its online model there (for lambda = 1 and for lambda in (0, 1)); "target" is the
  opt-in alternative above.
- pi/2 where the reference writes 1.57: in the consistency weight 4 / sin(pi t / 2), in the cosine
  time weighting cos(pi t / 2) and in the TrigFlow coefficients (ucgm_core.transports); the angle
  differs by 5.1e-4 relative.
- Few-step training (lambda > 0) with an enhanced target: the reference's x_tar, z_tar are the very
  tensors x, z, which its target enhancement updates in place, so its consistency passes feed the
  network the enhanced pair as well, though its code reads as feeding the true pair. We feed the
  network the true pair, and the enhanced pair enters through the conversion point y_r only.
- The finite-difference points t +- h are clamped into [time_epsilon, 1] (the reference does not
  clamp), and a label dropout that rounds to zero rows drops none.

Reference configuration names (LINs-lab/UCGM) and ours:

| reference            | here                                                                 |
|----------------------|----------------------------------------------------------------------|
| consistc_ratio       | consistency_ratio                                                    |
| ema_decay_rate       | target_network = "ema" + target_ema_decay; 0.0 -> "live", 1.0 -> "frozen" |
| enhanced_ratio       | enhanced_ratio (must be < 1 for lambda = 0; the reference remaps >= 1)|
| enhanced_range       | enhanced_range (mirrored for ReLinear, see below)                    |
| lab_drop_ratio       | label_dropout                                                        |
| scaled_cbl_eps       | loss_constant                                                        |
| wt_cosine_loss       | cosine_loss                                                          |
| weight_funcion       | time_weighting ("Cosine" -> "cosine", None -> "none"; mirrored for ReLinear) |
| time_dist_ctrl [a,b,c]| time_distribution = BetaTime(a=a, b=b, scale=c) (mirrored for ReLinear) |
| transport_type       | transport ("Linear" -> linear, "ReLinear" -> relinear, "TrigFlow" -> trigflow, "EDM" -> edm) |

ReLinear runs the other way in the reference's own time (t = 0 is noise there; ours is written in
our time, t = 0 data): for a reference ReLinear config every time-dependent setting must be
mirrored, t -> 1 - t. The time distribution becomes the law of 1 - t (for BetaTime with scale 1,
swap a and b), enhanced_range (lo, hi) becomes (1 - hi, 1 - lo), and the reference's cosine
weighting cos(1.57 t_ref) is sin(pi t / 2) in our time, which time_weighting does not offer.

Example::

    objective = UnifiedObjective(build_transport("linear"), ObjectiveSettings(enhanced_ratio=0.44))
    target = objective.create_target_network(model)
    out = objective(model, target.module(model), x, labels, generator=generator)
    out.loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as functional
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.time_distributions import BetaTime, TimeDistribution
from ucgm_core.transports import Transport, broadcast_time

from ucgm_core.systems.checks import check_choice, check_kind, check_time_distribution, refuse_teacher
from ucgm_core.systems.common import (
    Network,
    NoisedBatch,
    ObjectiveOutput,
    RandomStateReplay,
    draw_time,
    noised_batch,
    pseudo_huber,
    replaying,
    require_target_network,
)
from ucgm_core.systems.registry import SystemRecord, SystemSettings

Tensor = torch.Tensor

__all__ = [
    "CONSISTENCY_SCALE",
    "DERIVATIVE_BOUND",
    "ObjectiveSettings",
    "SYSTEM",
    "UnifiedObjective",
    "consistency_target",
    "discrete_consistency_difference",
    "enhanced_pair",
    "finite_difference_derivative",
    "jvp_derivative",
    "path_data_prediction",
    "per_sample_loss",
]

_HALF_PI = math.pi / 2
# target = F_t - (alpha / den) * (CONSISTENCY_SCALE / sin(pi t / 2)) * d, as in the UCGM paper.
CONSISTENCY_SCALE = 4.0
# |d/dt x_hat| is clamped to this bound before it enters the target.
DERIVATIVE_BOUND = 1.0

_STYLES = ("live_vs_unconditional", "target_vs_unconditional", "target_vs_data")


@dataclass(frozen=True)
class ObjectiveSettings(SystemSettings):
    """Settings of UCGM-T; defaults are the reference's multi-step defaults.

    time_epsilon: after sampling, t <- max(t, time_epsilon); the finite-difference points are
    also kept >= time_epsilon. Use a small value (e.g. 1e-4) with transports whose den vanishes
    at t = 0 (vp_cosine), or with lambda > 0, whose target divides by sin(pi t / 2) and (for
    lambda < 1) by eps = (1 - lambda) t. 0 (the default) changes nothing.
    kind: the job schema's name for UCGM-T among the systems (ucgm_core.systems).
    """

    kind: Literal["ucgm"] = "ucgm"
    time_distribution: TimeDistribution = field(default_factory=BetaTime)
    consistency_ratio: float = 0.0
    derivative: Literal["finite_difference", "jvp"] = "finite_difference"
    derivative_network: Literal["live", "target"] = "live"
    finite_difference_step: float = 0.005
    target_network: Literal["ema", "live", "frozen"] = "ema"
    target_ema_decay: float = 0.999
    target_decay_warmup: bool = True
    enhanced_ratio: float = 0.0
    enhanced_range: tuple[float, float] = (0.0, 0.75)
    enhanced_style: Literal["live_vs_unconditional", "target_vs_unconditional", "target_vs_data"] = (
        "live_vs_unconditional"
    )
    label_dropout: float = 0.1
    loss_constant: float = 0.0
    cosine_loss: bool = False
    time_weighting: Literal["none", "cosine"] = "none"
    time_epsilon: float = 0.0

    def __post_init__(self) -> None:
        check_kind(self, "ucgm")
        self._check_choices()
        self._check_ranges()
        self._check_enhancement()

    def _check_choices(self) -> None:
        check_choice(self, "derivative", ("finite_difference", "jvp"))
        check_choice(self, "derivative_network", ("live", "target"))
        check_choice(self, "target_network", ("ema", "live", "frozen"))
        check_choice(self, "enhanced_style", _STYLES)
        check_choice(self, "time_weighting", ("none", "cosine"))
        check_time_distribution(self)

    def _check_ranges(self) -> None:
        if not 0.0 <= self.consistency_ratio <= 1.0:
            raise ValueError(
                f"consistency_ratio must be in [0, 1], got {self.consistency_ratio}; "
                "use 0 for multi-step or 1 for few-step training"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}; the reference uses 0.1")
        if not 0.0 < self.finite_difference_step < 0.5:
            raise ValueError(
                f"finite_difference_step must be in (0, 0.5), got {self.finite_difference_step}; "
                "the reference uses 0.005"
            )
        if not 0.0 <= self.target_ema_decay <= 1.0:
            raise ValueError(
                f"target_ema_decay must be in [0, 1], got {self.target_ema_decay}; the reference uses 0.999 "
                "(for the live weights or frozen weights set target_network to 'live' or 'frozen')"
            )
        if self.loss_constant < 0.0:
            raise ValueError(f"loss_constant must be >= 0, got {self.loss_constant}; use 0 multi-step, 5-9 few-step")
        if not 0.0 <= self.time_epsilon < 1.0:
            raise ValueError(f"time_epsilon must be in [0, 1), got {self.time_epsilon}; use 0 or e.g. 1e-4")

    def _check_enhancement(self) -> None:
        bounds = tuple(self.enhanced_range)
        object.__setattr__(self, "enhanced_range", bounds)  # a config may hand in a list
        if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1] <= 1.0:
            raise ValueError(
                f"enhanced_range must be (low, high) with 0 <= low < high <= 1, got {self.enhanced_range}; "
                "the reference uses (0.0, 0.75)"
            )
        if self.enhanced_ratio < 0.0:
            raise ValueError(f"enhanced_ratio must be >= 0, got {self.enhanced_ratio}; use 0 to disable it")
        if self.consistency_ratio == 0.0 and self.enhanced_ratio >= 1.0:
            raise ValueError(
                f"enhanced_ratio must be < 1 when consistency_ratio is 0, got {self.enhanced_ratio}; "
                "use a value in [0, 1) (0.4-0.7 is recommended for multi-step training), or the few-step "
                "style (consistency_ratio > 0 with enhanced_style 'target_vs_data') for ratios >= 1"
            )

    @property
    def needs_target_network(self) -> bool:
        """theta- is evaluated only for an enhanced target, or for a consistency derivative taken
        through it (derivative_network = "target")."""
        through_target = self.consistency_ratio > 0.0 and self.derivative_network == "target"
        return self.enhanced_ratio > 0.0 or through_target


def _forward_mode_autodiff(settings: ObjectiveSettings) -> bool:
    """A JVP through the network only for the consistency derivative by JVP."""
    return settings.derivative == "jvp" and settings.consistency_ratio > 0.0


# --------------------------------------------------------------------------- small pieces


def path_data_prediction(
    transport: Transport,
    network: Network,
    x: Tensor,
    z: Tensor,
    labels: Tensor,
    *,
    data_target: Tensor | None = None,
    noise_target: Tensor | None = None,
    random_state: RandomStateReplay | None = None,
) -> Callable[[Tensor], Tensor]:
    """The function r -> x_hat(r) = (F(x_r, network_time(r), labels) alpha(r) - y_r alpha_hat(r)) / den(r)
    along the path x_r = alpha(r) z + gamma(r) x, with y_r = alpha(r) z_tar + gamma(r) x_tar
    (y_r = x_r when no targets are given): the network sees the true pair, the conversion the
    enhanced one. r has shape (B,). Each call replays `random_state`."""
    enhanced = data_target is not None and noise_target is not None

    def prediction(time: Tensor) -> Tensor:
        x_time = transport.interpolate(x, z, time)
        with replaying(random_state):
            output = network(x_time, transport.network_time(time), labels)
        conversion_point = transport.interpolate(data_target, noise_target, time) if enhanced else x_time
        return transport.predictions(output, conversion_point, time)[0]

    return prediction


def finite_difference_derivative(
    prediction: Callable[[Tensor], Tensor], time: Tensor, step: float, lower: float = 0.0
) -> Tensor:
    """Central difference (f(t + h) - f(t - h)) / span with t + h clamped to <= 1 and t - h to
    >= lower, span being the actual clamped distance (one-sided near the ends)."""
    time_plus = (time + step).clamp(max=1.0)
    time_minus = (time - step).clamp(min=lower)
    difference = prediction(time_plus) - prediction(time_minus)
    return difference / broadcast_time(time_plus - time_minus, difference)


def jvp_derivative(prediction: Callable[[Tensor], Tensor], time: Tensor) -> Tensor:
    """d/dt f(t) per sample by forward-mode AD (torch.func.jvp with tangent 1 for every sample).
    The network must support forward-mode AD (e.g. math attention, no fused SDPA kernels)."""
    _, tangent = torch.func.jvp(prediction, (time,), (torch.ones_like(time),))
    return tangent


def discrete_consistency_difference(
    prediction: Callable[[Tensor], Tensor], current_prediction: Tensor, time: Tensor, ratio: float
) -> Tensor:
    """(x_hat(t) - x_hat_theta-(lambda t)) / eps with eps = t - lambda t."""
    step = time - ratio * time
    difference = current_prediction - prediction(ratio * time)
    return difference / broadcast_time(step, difference)


def consistency_target(transport: Transport, output: Tensor, derivative: Tensor, time: Tensor) -> Tensor:
    """stopgrad(F_t) - (alpha(t) / den(t)) (4 / sin(pi t / 2)) clamp(d, -1, 1)."""
    # broadcast against the derivative, which is in the (float32 or wider) prediction dtype even
    # when the network output is bfloat16.
    shaped_time = broadcast_time(time, derivative)
    coefficients = transport.coefficients(shaped_time)
    weight = CONSISTENCY_SCALE / torch.sin(_HALF_PI * shaped_time)
    bounded = derivative.clamp(-DERIVATIVE_BOUND, DERIVATIVE_BOUND)
    return output.detach() - (coefficients.alpha / coefficients.denominator) * weight * bounded


def enhanced_pair(
    truth: tuple[Tensor, Tensor],
    conditional: tuple[Tensor, Tensor],
    guide: tuple[Tensor, Tensor],
    time: Tensor,
    *,
    ratio: float,
    time_range: tuple[float, float],
    number_dropped: int,
) -> tuple[Tensor, Tensor]:
    """(x_tar, z_tar) from the true pair, a conditional and a guide prediction (pairs of (x, z)):
    truth + ratio (cond - guide) for kept rows with low < t < high, (truth + cond) / 2 for other
    kept rows, (truth + guide) / 2 for the last `number_dropped` rows."""
    batch = time.shape[0]
    kept = torch.arange(batch, device=time.device) < batch - number_dropped
    inside = (time > time_range[0]) & (time < time_range[1])
    row_shape = (batch,) + (1,) * (truth[0].ndim - 1)
    boosted_rows = (kept & inside).reshape(row_shape)
    kept_rows = kept.reshape(row_shape)

    def combine(true_value: Tensor, conditional_value: Tensor, guide_value: Tensor) -> Tensor:
        boosted = true_value + ratio * (conditional_value - guide_value)
        toward_conditional = (true_value + conditional_value) / 2
        toward_guide = (true_value + guide_value) / 2
        return torch.where(boosted_rows, boosted, torch.where(kept_rows, toward_conditional, toward_guide))

    return (
        combine(truth[0], conditional[0], guide[0]),
        combine(truth[1], conditional[1], guide[1]),
    )


def per_sample_loss(
    output: Tensor,
    target: Tensor,
    time: Tensor,
    *,
    constant: float = 0.0,
    cosine_loss: bool = False,
    time_weighting: str = "none",
) -> Tensor:
    """sqrt(mean((F - target)^2) + c^2) - c [+ mean(1 - cos(F, target) over dim 1)] [* cos(pi t/2)],
    shape (B,). Computed in at least float32."""
    compute_dtype = torch.promote_types(output.dtype, torch.float32)
    output, target = output.to(compute_dtype), target.to(compute_dtype)
    loss = pseudo_huber(output, target, constant)
    if cosine_loss:
        dissimilarity = 1 - functional.cosine_similarity(output, target, dim=1)
        loss = loss + dissimilarity.reshape(dissimilarity.shape[0], -1).mean(dim=1)
    if time_weighting == "cosine":
        loss = loss * torch.cos(_HALF_PI * time.to(compute_dtype))
    return loss


# --------------------------------------------------------------------------- the objective


class UnifiedObjective:
    """UCGM-T (see the module docstring). Call it once per training step."""

    def __init__(
        self, transport: Transport, settings: ObjectiveSettings | None = None, *, teacher: Network | None = None
    ) -> None:
        refuse_teacher(teacher, "UCGM-T", "few-step training starts from a multi-step model's weights instead")
        self.transport = transport
        self.settings = settings if settings is not None else ObjectiveSettings()

    @property
    def needs_target_network(self) -> bool:
        return self.settings.needs_target_network

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        """The target network the settings ask for (policy, EMA decay, warm-up)."""
        s = self.settings
        return TargetNetwork.create(s.target_network, model, s.target_ema_decay, s.target_decay_warmup)

    def extra_modules(self) -> list[nn.Module]:
        """Modules with parameters the optimiser must train besides the network's: none here
        (the training-objective interface of ucgm_core.systems; sCM's learned weight is one)."""
        return []

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
        """One step's loss. `step` (the optimiser step, for warm-ups) is accepted so that every
        training objective has the same call signature; UCGM-T has no step-dependent part."""
        settings = self.settings
        why = "enhanced_ratio > 0 (or derivative_network 'target') needs one"
        require_target_network(target_network, settings.needs_target_network, why)
        time = draw_time(settings.time_distribution, x, generator, settings.time_epsilon)
        batch = noised_batch(
            self.transport, x, labels, time,
            generator=generator, null_label=null_label_of(network, num_classes), label_dropout=settings.label_dropout,
        )

        random_state = RandomStateReplay(x.device)
        output = network(batch.x_time, self.transport.network_time(time), batch.labels)
        with torch.no_grad():
            target, metrics = self._target(batch, output.detach(), network, target_network, random_state)

        losses = per_sample_loss(
            output,
            target,
            time,
            constant=settings.loss_constant,
            cosine_loss=settings.cosine_loss,
            time_weighting=settings.time_weighting,
        )
        loss = losses.mean()
        metrics.update(
            loss=loss.detach(),
            mse_to_target=(output.detach() - target).pow(2).mean(),
            mean_time=time.mean(),
        )
        return ObjectiveOutput(loss=loss, metrics=metrics)

    # -- target ----------------------------------------------------------------------------

    def _target(
        self,
        batch: NoisedBatch,
        output: Tensor,
        network: Network,
        target_network: Network | None,
        random_state: RandomStateReplay,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        settings = self.settings
        data_target, noise_target = batch.data, batch.noise
        if settings.enhanced_ratio > 0.0:
            data_target, noise_target = self._enhanced_target(batch, output, target_network, random_state)
        if settings.consistency_ratio == 0.0:
            return self.transport.ideal_output(data_target, noise_target, batch.time), {}

        prediction = path_data_prediction(
            self.transport,
            network if settings.derivative_network == "live" else target_network,
            batch.data,
            batch.noise,
            batch.labels,
            data_target=data_target,
            noise_target=noise_target,
            random_state=random_state,
        )
        derivative = self._consistency_derivative(prediction, batch, output, data_target, noise_target)
        clamped = (derivative.abs() > DERIVATIVE_BOUND).float().mean()
        target = consistency_target(self.transport, output, derivative, batch.time)
        return target, {"derivative_clamped_fraction": clamped}

    def _consistency_derivative(
        self,
        prediction: Callable[[Tensor], Tensor],
        batch: NoisedBatch,
        output: Tensor,
        data_target: Tensor,
        noise_target: Tensor,
    ) -> Tensor:
        settings = self.settings
        if settings.consistency_ratio == 1.0:
            if settings.derivative == "jvp":
                return jvp_derivative(prediction, batch.time)
            return finite_difference_derivative(
                prediction, batch.time, settings.finite_difference_step, lower=settings.time_epsilon
            )
        conversion_point = self.transport.interpolate(data_target, noise_target, batch.time)
        current = self.transport.predictions(output, conversion_point, batch.time)[0]
        return discrete_consistency_difference(prediction, current, batch.time, settings.consistency_ratio)

    def _enhanced_target(
        self, batch: NoisedBatch, output: Tensor, target_network: Network, random_state: RandomStateReplay
    ) -> tuple[Tensor, Tensor]:
        """(x_tar, z_tar) for the configured enhanced_style (table in the module docstring)."""
        style = self.settings.enhanced_style

        def target_predictions(labels: Tensor) -> tuple[Tensor, Tensor]:
            with random_state.replayed():
                target_output = target_network(batch.x_time, self.transport.network_time(batch.time), labels)
            return self.transport.predictions(target_output, batch.x_time, batch.time)

        null_labels = torch.full_like(batch.labels, batch.null_label)
        if style == "live_vs_unconditional":
            conditional = self.transport.predictions(output, batch.x_time, batch.time)
            guide = target_predictions(null_labels)
        elif style == "target_vs_unconditional":
            conditional = target_predictions(batch.labels)
            guide = target_predictions(null_labels)
        else:  # "target_vs_data"
            conditional = target_predictions(batch.labels)
            guide = (batch.data, batch.noise)
        return enhanced_pair(
            (batch.data, batch.noise),
            conditional,
            guide,
            batch.time,
            ratio=self.settings.enhanced_ratio,
            time_range=tuple(self.settings.enhanced_range),
            number_dropped=batch.number_dropped,
        )


SYSTEM = SystemRecord(
    kind="ucgm",
    settings=ObjectiveSettings,
    objective=UnifiedObjective,
    default_transport="linear",
    forward_mode_autodiff=_forward_mode_autodiff,
)
