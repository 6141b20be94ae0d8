"""UCGM-T: the unified training objective (ALGORITHMS.md section 3).

One batch (x, labels) is trained as follows (t = 0 data, t = 1 noise):

1. Label dropout: the last round(p B) rows get the null label `num_classes` (none when that
   rounds to 0; the reference's `c[-0:]` would drop all). The caller's tensor is not modified.
2. Draw t ~ time distribution, then z ~ N(0, I), both from the caller's generator;
   x_t = alpha(t) z + gamma(t) x and F_t = F_theta(x_t, network_time(t), labels).
3. The target, computed without gradient:

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
   y_r = alpha(r) z_tar + gamma(r) x_tar. Without enhancement y_r = x_r; with it the conversion
   uses the enhanced pair while the network sees the true pair, as the reference code does.
   Which weights the derivative is taken through is `derivative_network`: "live" (the default)
   evaluates the online weights under stop-gradient, as the reference code and sCM do; "target"
   evaluates theta-, the paper's literal reading. With a frozen theta- (few-step training from a
   multi-step checkpoint) "target" is unstable: d never changes, so every step pushes F the same
   way and the output grows without bound (seen on the 8-Gaussians toy); theta- then serves the
   enhanced target only, as in the reference.
4. Loss per sample: sqrt(mean((F_t - target)^2) + c^2) - c, plus mean(1 - cos(F_t, target)) over
   the channel axis (dim 1) when `cosine_loss`, times cos(pi t / 2) when time_weighting is
   "cosine"; the loss is the batch mean. With c = 0 this is a per-sample RMSE, not an MSE.

Enhanced target (training-time guidance, zeta = enhanced_ratio > 0). With a conditional
prediction (x_c, z_c) and a reference prediction (x_r, z_r), each of x_tar, z_tar is

    rows kept, t strictly inside enhanced_range:  truth + zeta (cond - ref)
    rows kept, t outside the range:              (truth + cond) / 2
    rows with a dropped label:                   (truth + ref) / 2

| enhanced_style            | reference name | cond                              | ref                     |
|---------------------------|----------------|-----------------------------------|-------------------------|
| "live_vs_unconditional"   | ft-vs-fe       | live F_t (detached), its labels   | theta-, null labels     |
| "target_vs_unconditional" | fc-vs-fe       | theta-, the (dropped) labels      | theta-, null labels     |
| "target_vs_data"          | fc-vs-xz       | theta-, the (dropped) labels      | the true pair (x, z)    |

With "target_vs_data" the dropped rows therefore keep the true pair, as in the reference.

Every extra forward pass (target network, finite-difference points, JVP) replays the RNG state
from just before the online forward pass, so in-model dropout draws the same masks; the global
RNG is left where the online pass left it.

Reference configuration names (LINs-lab/UCGM) and ours:

| reference            | here                                                                 |
|----------------------|----------------------------------------------------------------------|
| consistc_ratio       | consistency_ratio                                                    |
| ema_decay_rate       | target_network = "ema" + target_ema_decay; 0.0 -> "live", 1.0 -> "frozen" |
| enhanced_ratio       | enhanced_ratio (must be < 1 for lambda = 0; the reference remaps >= 1)|
| enhanced_range       | enhanced_range                                                       |
| lab_drop_ratio       | label_dropout                                                        |
| scaled_cbl_eps       | loss_constant                                                        |
| wt_cosine_loss       | cosine_loss                                                          |
| weight_funcion       | time_weighting ("Cosine" -> "cosine", None -> "none")                |
| time_dist_ctrl [a,b,c]| time_distribution = BetaTime(a=a, b=b, scale=c)                     |

Example::

    objective = UnifiedObjective(build_transport("linear"), ObjectiveSettings(enhanced_ratio=0.44))
    target = objective.create_target_network(model)
    out = objective(model, target.module(model), x, labels, generator=generator)
    out.loss.backward()
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as functional
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.time_distributions import BetaTime, TimeDistribution
from ucgm_core.transports import Transport, broadcast_time

Tensor = torch.Tensor
Network = Callable[..., Tensor]

_HALF_PI = math.pi / 2
# target = F_t - (alpha / den) * (CONSISTENCY_SCALE / sin(pi t / 2)) * d, as in the UCGM paper.
CONSISTENCY_SCALE = 4.0
# |d/dt x_hat| is clamped to this bound before it enters the target.
DERIVATIVE_BOUND = 1.0

_STYLES = ("live_vs_unconditional", "target_vs_unconditional", "target_vs_data")


@dataclass(frozen=True)
class ObjectiveSettings:
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
        if self.kind != "ucgm":
            raise ValueError(f"kind must be 'ucgm' for ObjectiveSettings, got {self.kind!r}; leave kind at its default")
        self._check_choices()
        self._check_ranges()
        self._check_enhancement()

    # what the training loop must provide, as for the systems' settings (ucgm_core.systems)
    needs_two_time_network = False
    default_transport = "linear"

    @property
    def needs_forward_mode_autodiff(self) -> bool:
        return self.derivative == "jvp" and self.consistency_ratio > 0.0

    def _check_choices(self) -> None:
        choices = {
            "derivative": ("finite_difference", "jvp"),
            "derivative_network": ("live", "target"),
            "target_network": ("ema", "live", "frozen"),
            "enhanced_style": _STYLES,
            "time_weighting": ("none", "cosine"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not hasattr(self.time_distribution, "sample"):
            raise ValueError(
                f"time_distribution must be a time distribution (e.g. BetaTime()), got {self.time_distribution!r}"
            )

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


@dataclass
class ObjectiveOutput:
    """loss: scalar, differentiable w.r.t. the online network only; metrics: detached scalars."""

    loss: Tensor
    metrics: dict[str, Tensor]


# --------------------------------------------------------------------------- random state


class RandomStateReplay:
    """The CPU RNG state (and the CUDA one of `device`, if it is a CUDA device) at capture time.

    `replayed()` sets the captured state for the duration of the block and then puts back the state
    that was current before it, so replays do not move the global RNG stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cpu_state, self.cuda_state = self._current()

    def _current(self) -> tuple[Tensor, Tensor | None]:
        cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda_state

    def _restore(self, cpu_state: Tensor, cuda_state: Tensor | None) -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        saved = self._current()
        self._restore(self.cpu_state, self.cuda_state)
        try:
            yield
        finally:
            self._restore(*saved)


# --------------------------------------------------------------------------- small pieces


def drop_labels(labels: Tensor, probability: float, null_label: int) -> tuple[Tensor, int]:
    """A copy of `labels` whose last round(probability * B) rows are `null_label` (Python's
    round, as the reference), and that number. Zero rows are dropped when it rounds to 0."""
    number_dropped = round(probability * labels.shape[0])
    dropped = labels.clone()
    if number_dropped > 0:
        dropped[labels.shape[0] - number_dropped :] = null_label
    return dropped, number_dropped


def draw_time_and_noise(
    x: Tensor, time_distribution: TimeDistribution, generator: torch.Generator, time_epsilon: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(t, z): first t ~ time_distribution of shape (B,), then z ~ N(0, I) shaped like x, both
    from `generator` on x's device. t is float64 for float64 data, float32 otherwise, and is
    clamped to at least `time_epsilon`."""
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    time = time_distribution.sample(x.shape[0], generator=generator, device=x.device, dtype=time_dtype)
    if time_epsilon > 0.0:
        time = time.clamp(min=time_epsilon)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return time, noise


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
    (y_r = x_r when no targets are given). r has shape (B,). Each call replays `random_state`."""
    replay = random_state.replayed if random_state is not None else contextlib.nullcontext
    enhanced = data_target is not None and noise_target is not None

    def prediction(time: Tensor) -> Tensor:
        x_time = transport.interpolate(x, z, time)
        with replay():
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
    reference: tuple[Tensor, Tensor],
    time: Tensor,
    *,
    ratio: float,
    time_range: tuple[float, float],
    number_dropped: int,
) -> tuple[Tensor, Tensor]:
    """(x_tar, z_tar) from the true pair, a conditional and a reference prediction (pairs of
    (x, z)): truth + ratio (cond - ref) for kept rows with low < t < high, (truth + cond) / 2 for
    other kept rows, (truth + ref) / 2 for the last `number_dropped` rows."""
    batch = time.shape[0]
    kept = torch.arange(batch, device=time.device) < batch - number_dropped
    inside = (time > time_range[0]) & (time < time_range[1])
    row_shape = (batch,) + (1,) * (truth[0].ndim - 1)
    boosted_rows = (kept & inside).reshape(row_shape)
    kept_rows = kept.reshape(row_shape)

    def combine(true_value: Tensor, conditional_value: Tensor, reference_value: Tensor) -> Tensor:
        boosted = true_value + ratio * (conditional_value - reference_value)
        toward_conditional = (true_value + conditional_value) / 2
        toward_reference = (true_value + reference_value) / 2
        return torch.where(boosted_rows, boosted, torch.where(kept_rows, toward_conditional, toward_reference))

    return (
        combine(truth[0], conditional[0], reference[0]),
        combine(truth[1], conditional[1], reference[1]),
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
    squared = (output - target).pow(2).flatten(1).mean(dim=1)
    loss = torch.sqrt(squared + constant**2) - constant
    if cosine_loss:
        dissimilarity = 1 - functional.cosine_similarity(output, target, dim=1)
        loss = loss + dissimilarity.reshape(dissimilarity.shape[0], -1).mean(dim=1)
    if time_weighting == "cosine":
        loss = loss * torch.cos(_HALF_PI * time.to(compute_dtype))
    return loss


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class _Batch:
    """What one training step drew: data, noise, time, the path point and the dropped labels."""

    data: Tensor
    noise: Tensor
    time: Tensor
    x_time: Tensor
    labels: Tensor
    null_label: int
    number_dropped: int


class UnifiedObjective:
    """UCGM-T (see the module docstring). Call it once per training step."""

    def __init__(self, transport: Transport, settings: ObjectiveSettings | None = None) -> None:
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
        if settings.needs_target_network and target_network is None:
            raise ValueError(
                "target_network is None but enhanced_ratio > 0 (or derivative_network='target') needs one; "
                "pass TargetNetwork.module(online) (see UnifiedObjective.create_target_network)"
            )
        null_label = null_label_of(network, num_classes)
        dropped_labels, number_dropped = drop_labels(labels, settings.label_dropout, null_label)
        time, noise = draw_time_and_noise(x, settings.time_distribution, generator, settings.time_epsilon)
        x_time = self.transport.interpolate(x, noise, time)
        batch = _Batch(x, noise, time, x_time, dropped_labels, null_label, number_dropped)

        random_state = RandomStateReplay(x.device)
        output = network(x_time, self.transport.network_time(time), dropped_labels)
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
        batch: _Batch,
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
            return self.transport.target(data_target, noise_target, batch.time), {}

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
        batch: _Batch,
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
        self, batch: _Batch, output: Tensor, target_network: Network, random_state: RandomStateReplay
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
            reference = target_predictions(null_labels)
        elif style == "target_vs_unconditional":
            conditional = target_predictions(batch.labels)
            reference = target_predictions(null_labels)
        else:  # "target_vs_data"
            conditional = target_predictions(batch.labels)
            reference = (batch.data, batch.noise)
        return enhanced_pair(
            (batch.data, batch.noise),
            conditional,
            reference,
            batch.time,
            ratio=self.settings.enhanced_ratio,
            time_range=tuple(self.settings.enhanced_range),
            number_dropped=batch.number_dropped,
        )
