"""ESC, "explicit and easier shortcut" (Lin et al., "On the Design of One-step Diffusion via
Shortcutting Flow Paths", arXiv 2512.11831): MeanFlow's average-velocity objective plus a plug-in
velocity, a progressive time sampler and sCM's training tricks.

The network u(x_t, t, r) predicts the average velocity over [r, t], so x_r = x_t - (t - r) u
(the linear transport; on relinear the network predicts -u and every formula below holds with F for u).
MeanFlow's identity u = v - (t - r) du/dt, with du/dt the total derivative along the trajectory
(dx/dt = v, dr/dt = 0, dt/dt = 1), gives the target (Geng et al. 2025, eq. 10)

    u_tgt = v_eff - rho (t - r) stopgrad(JVP of u along (v_eff, 0, 1)),     rho = tangent warm-up,

which is exact, u_tgt = u, when u is the true average velocity and v_eff the true marginal velocity.

Per step (time and noise from the caller's generator):
- (r, t): two draws of `time_distribution` (logit-normal(-0.4, 1)), sorted; progressive sampler:
  r <- 0 with probability p0(step) = arccos(step / K) / (pi/2), K = `endpoint_zero_steps`
  (1 at step 0, 0 from step K on); then r <- t for a fraction `instantaneous_fraction` (0.75) of rows.
- v_eff: the conditional velocity F*(x, z, t), or, for a random `plug_in_probability` share of rows,
  the plug-in velocity: the exact marginal velocity of the mini-batch's empirical distribution,
  E[F* | x_t] with posterior weights softmax_i(-|x_t - gamma x_i|^2 / (2 alpha^2)) over the batch's data
  x_i (restricted to rows of the same label, or all rows for a null label: our stand-in for the
  paper's class-consistent batches).
- training-time guidance (MeanFlow sec. 4.2), for rows with a kept label and t in guidance_interval:
  v_eff <- omega v_eff + kappa u-(x_t, t, t | c) + (1 - omega - kappa) u-(x_t, t, t | null).
- loss per row: e = mean((u - u_tgt)^2), adaptive l = e / stopgrad((e + c)^p) (MeanFlow's p = 1,
  c = 1e-3, with e a mean over dimensions here), then sCM's learned weight exp(-w(t, r)) l + w.

theta- is the live network under stop-gradient (MeanFlow; the ESC reference's tgt_decay 0).
Sampling: one step from t = 1 to r = 0, x = z - u(z, 1, 0): UCGM-S with steps 1 and
condition_on_end_time (`sampler_settings`); more steps are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.sampler import SamplerSettings
from ucgm_core.time_distributions import LogitNormalTime, TimeDistribution
from ucgm_core.transports import Transport, broadcast_time

from ucgm_core.systems.checks import (
    check_bool,
    check_fraction,
    check_kind,
    check_nonnegative_int,
    check_positive,
    check_time_distribution,
    refuse_teacher,
    require_transport,
)
from ucgm_core.systems.common import (
    AdaptiveWeight,
    Network,
    ObjectiveOutput,
    RandomStateReplay,
    adaptively_weighted,
    call_two_time,
    forward_derivative,
    noised_batch,
    per_sample_mean_square,
    row_mask,
    time_dtype,
    warmup_ratio,
)
from ucgm_core.systems.registry import SystemRecord, SystemSettings, always

Tensor = torch.Tensor

TRANSPORTS = ("linear", "relinear")


@dataclass(frozen=True)
class ExplicitShortcutSettings(SystemSettings):
    """ESC settings; defaults are the ESC reference's ImageNet run (exp/esc-b2-cc).

    guidance_scale (omega) and guidance_mixing (kappa) define the training-time guidance; omega = 1,
    kappa = 0 turns it off. endpoint_zero_steps 0 disables the progressive sampler.
    """

    kind: Literal["esc"] = "esc"
    time_distribution: TimeDistribution = field(default_factory=lambda: LogitNormalTime(mean=-0.4, std=1.0))
    instantaneous_fraction: float = 0.75
    plug_in_probability: float = 0.5
    endpoint_zero_steps: int = 20_000
    tangent_warmup_steps: int = 10_000
    adaptive_loss_power: float = 1.0
    adaptive_loss_constant: float = 1e-3
    adaptive_weighting: bool = True
    adaptive_weight_frequencies: int = 16
    guidance_scale: float = 1.0
    guidance_mixing: float = 0.5
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_kind(self, "esc")
        check_time_distribution(self)
        check_fraction(self, "instantaneous_fraction", "MeanFlow and ESC use 0.75 (rows with r = t)")
        check_fraction(self, "plug_in_probability", "ESC uses 0.5 (0 disables the plug-in velocity)")
        check_nonnegative_int(self, "endpoint_zero_steps", "ESC uses 20000 (0 disables the progressive sampler)")
        check_nonnegative_int(self, "tangent_warmup_steps", "ESC uses 10000 (0 disables the warm-up)")
        if not (isinstance(self.adaptive_loss_power, (int, float)) and self.adaptive_loss_power >= 0):
            raise ValueError(f"adaptive_loss_power must be >= 0, got {self.adaptive_loss_power!r}; MeanFlow uses 1 (0: plain MSE)")
        check_positive(self, "adaptive_loss_constant", "MeanFlow uses 1e-3")
        check_bool(self, "adaptive_weighting")
        check_nonnegative_int(self, "adaptive_weight_frequencies", "use 16", minimum=1)
        for name in ("guidance_scale", "guidance_mixing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}; omega = 1, kappa = 0 is no guidance")
        interval = tuple(self.guidance_interval)
        object.__setattr__(self, "guidance_interval", interval)
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, got {self.guidance_interval}")
        check_fraction(self, "label_dropout", "use 0.1 for classifier-free guidance", closed_top=False)

    @property
    def guided(self) -> bool:
        return not (self.guidance_scale == 1.0 and self.guidance_mixing == 0.0)

    def endpoint_zero_probability(self, step: int | None) -> float:
        """p0 = arccos(step / K) / (pi/2) while step < K, else 0 (ESC's progressive time sampler)."""
        if step is None or self.endpoint_zero_steps == 0 or step >= self.endpoint_zero_steps:
            return 0.0
        return math.acos(max(0, step) / self.endpoint_zero_steps) / (math.pi / 2)


def plug_in_velocity(
    transport: Transport, data: Tensor, x_time: Tensor, time: Tensor, labels: Tensor, null_label: int
) -> Tensor:
    """E[F*(x, z, t) | x_t] under the batch's empirical data distribution, per row j:
    weights w_ji = softmax_i(-|x_t_j - gamma_j x_i|^2 / (2 alpha_j^2)) over rows i with label_i = label_j
    (all rows when label_j is the null label), x_bar_j = sum_i w_ji x_i, z_bar_j = (x_t_j - gamma_j x_bar_j)/alpha_j,
    result F*(x_bar_j, z_bar_j, t_j). Memory O(B^2 + B D). Needs t > 0."""
    batch = data.shape[0]
    flat_data = data.reshape(batch, -1).to(torch.float64)
    flat_x = x_time.reshape(batch, -1).to(torch.float64)
    c = transport.coefficients(time.to(torch.float64))
    alpha, gamma = c.alpha[:, None], c.gamma[:, None]
    # |x_t_j - gamma_j x_i|^2 = |x_t_j|^2 - 2 gamma_j <x_t_j, x_i> + gamma_j^2 |x_i|^2
    cross = flat_x @ flat_data.T
    distance = (flat_x.pow(2).sum(1)[:, None] - 2 * gamma * cross + gamma**2 * flat_data.pow(2).sum(1)[None, :])
    logits = -distance / (2 * alpha**2)
    same_class = (labels[:, None] == labels[None, :]) | (labels[:, None] == null_label)
    logits = logits.masked_fill(~same_class, -math.inf)
    weights = torch.softmax(logits, dim=1)
    mean_data = (weights @ flat_data).reshape(data.shape)
    wide_time = time.to(torch.float64)
    coefficients = transport.coefficients(broadcast_time(wide_time, mean_data))
    mean_noise = (x_time.to(torch.float64) - coefficients.gamma * mean_data) / coefficients.alpha
    return transport.ideal_output(mean_data, mean_noise, wide_time).to(x_time.dtype)


def mean_flow_target(
    network: Network,
    transport: Transport,
    x_time: Tensor,
    time: Tensor,
    end_time: Tensor,
    velocity: Tensor,
    labels: Tensor,
    *,
    warmup: float = 1.0,
    random_state: RandomStateReplay | None = None,
) -> Tensor:
    """v - warmup (t - r) d/dt u(x_t, t, r) with the derivative a JVP along (v, 1) in (x_t, t) at fixed r.
    Call under torch.no_grad."""

    def output(x: Tensor, t: Tensor) -> Tensor:
        return call_two_time(network, transport, x, t, labels, end_time)

    _, derivative = forward_derivative(output, (x_time, time), (velocity, torch.ones_like(time)), random_state)
    span = broadcast_time(time - end_time, x_time)
    return velocity - warmup * span * derivative.to(velocity.dtype)


class ExplicitShortcutObjective:
    """ESC training (module docstring; `TrainingObjective`)."""

    def __init__(
        self, transport: Transport, settings: ExplicitShortcutSettings | None = None, *, teacher: Network | None = None
    ) -> None:
        refuse_teacher(teacher, "ESC")
        self.settings = settings if settings is not None else ExplicitShortcutSettings()
        require_transport(transport, TRANSPORTS, "ESC")
        self.transport = transport
        self.weight = (
            AdaptiveWeight(times=2, frequencies=self.settings.adaptive_weight_frequencies)
            if self.settings.adaptive_weighting
            else None
        )

    needs_target_network = False  # the live network under stop-gradient

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        return TargetNetwork.create("live", model)

    def extra_modules(self) -> list[nn.Module]:
        """[w(t, r)] when adaptive_weighting: the loop must train (and checkpoint) its parameters."""
        return [self.weight] if self.weight is not None else []

    def draw_times(
        self, batch: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype, step: int | None
    ) -> tuple[Tensor, Tensor]:
        """(t, r), each (B,), with r <= t (see the module docstring)."""
        settings = self.settings
        pairs = settings.time_distribution.sample(2 * batch, generator=generator, device=device, dtype=dtype)
        ordered, _ = torch.sort(pairs.reshape(batch, 2), dim=1)
        end_time, time = ordered[:, 0], ordered[:, 1]
        to_zero = torch.rand(batch, generator=generator, device=device) < settings.endpoint_zero_probability(step)
        end_time = torch.where(to_zero, torch.zeros_like(end_time), end_time)
        instantaneous = torch.rand(batch, generator=generator, device=device) < settings.instantaneous_fraction
        end_time = torch.where(instantaneous, time, end_time)
        return time, end_time

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
        time, end_time = self.draw_times(x.shape[0], generator, x.device, time_dtype(x), step)
        batch = noised_batch(
            transport, x, labels, time,
            generator=generator, null_label=null_label_of(network, num_classes), label_dropout=settings.label_dropout,
        )
        x_time, dropped, null_label = batch.x_time, batch.labels, batch.null_label
        # drawn after the noise: the generator's order is times, noise, plug-in rows
        plug_in_rows = torch.rand(x.shape[0], generator=generator, device=x.device) < settings.plug_in_probability

        random_state = RandomStateReplay(x.device)
        output = call_two_time(network, transport, x_time, time, dropped, end_time)
        ratio = warmup_ratio(step, settings.tangent_warmup_steps)
        with torch.no_grad():
            velocity = transport.ideal_output(x, batch.noise, time)
            if settings.plug_in_probability > 0:
                plugged = plug_in_velocity(transport, x, x_time, time, dropped, null_label)
                velocity = torch.where(row_mask(plug_in_rows, x_time), plugged, velocity)
            if settings.guided:
                velocity = self._guided_velocity(network, x_time, time, velocity, dropped, null_label, random_state)
            target = mean_flow_target(
                network, transport, x_time, time, end_time, velocity, dropped, warmup=ratio, random_state=random_state
            )

        errors = per_sample_mean_square(output - target)
        adaptive = errors / (errors.detach() + settings.adaptive_loss_constant) ** settings.adaptive_loss_power
        losses = adaptively_weighted(adaptive, self.weight, time, end_time)
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "mse_to_target": errors.detach().mean(),
            "instantaneous_fraction": (end_time == time).float().mean(),
            "tangent_warmup": torch.tensor(ratio),
            "mean_time": time.mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _guided_velocity(
        self,
        network: Network,
        x_time: Tensor,
        time: Tensor,
        velocity: Tensor,
        labels: Tensor,
        null_label: int,
        random_state: RandomStateReplay,
    ) -> Tensor:
        """omega v + kappa u-(x_t, t, t | c) + (1 - omega - kappa) u-(x_t, t, t | null) on guided rows."""
        settings = self.settings
        low, high = settings.guidance_interval
        rows = (labels != null_label) & (time >= low) & (time <= high)
        if not bool(rows.any()):
            return velocity
        null_labels = torch.full_like(labels, null_label)
        with random_state.replayed():
            both = call_two_time(
                network, self.transport, torch.cat([x_time, x_time]), torch.cat([time, time]),
                torch.cat([labels, null_labels]), torch.cat([time, time]),
            ).to(velocity.dtype)
        conditional, unconditional = both.chunk(2)
        omega, kappa = settings.guidance_scale, settings.guidance_mixing
        guided = omega * velocity + kappa * conditional + (1 - omega - kappa) * unconditional
        return torch.where(row_mask(rows, x_time), guided, velocity)


def sampler_settings(steps: int = 1) -> SamplerSettings:
    """One jump from t = 1 to 0 (1 NFE), or `steps` equal jumps, each told its end time."""
    return SamplerSettings(steps=steps, boundary_gaps=(0.0, 0.0), stochasticity=0.0, condition_on_end_time=True)


SYSTEM = SystemRecord(
    kind="esc",
    settings=ExplicitShortcutSettings,
    objective=ExplicitShortcutObjective,
    default_transport="linear",
    transports=TRANSPORTS,
    two_time_network=True,
    forward_mode_autodiff=always,
)
