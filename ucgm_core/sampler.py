"""UCGM-S: the unified sampler (ALGORITHMS.md §4, §7), written against any `Transport`.

From noise at t_0 (near 1) to data at t_N = 0, one network evaluation per step:

    F       = network(x, network_time(t_cur), labels)         (guided: F_u + w (F_c - F_u))
    x_hat, z_hat = transport.predictions(F, x, t_cur)
    x_hat, z_hat += kappa (raw - previous raw)                  (extrapolation, from the third step)
    x_next  = gamma(t_next) x_hat + alpha(t_next) (sqrt(1 - rho) z_hat + sqrt(rho) eps)

rho = 0 is the deterministic DDIM/Euler-like sampler, rho = 1 re-noises each prediction as a
consistency-model sampler does. The returned sample is the last raw x_hat: the move to t = 0 is
never evaluated, so a first-order run costs exactly `steps` network evaluations.

Example::

    settings = SamplerSettings(steps=40, schedule=(1.2, 0.72, 1.2), extrapolation=0.54,
                               guidance_scale=2.5, guidance_interval=(0.0, 0.76))
    g = torch.Generator(device=noise.device).manual_seed(0)
    images = sample(model, build_transport("linear"), noise, labels, settings, generator=g)

Names in the UCGM reference configs map as: sampling_steps -> steps, time_dist_ctrl -> schedule,
rfba_gap_steps -> boundary_gaps, extrapol_ratio -> extrapolation, stochast_ratio ->
stochasticity, sampling_order -> order, cfg_scale -> guidance_scale, cfg_interval ->
guidance_interval (the reference compares the interval with the *network's* time; ours is the
library time t, so a ReLinear config's [lo, hi] becomes [1 - hi, 1 - lo]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ucgm_core.labels import null_label_of
from ucgm_core.transports import Transport

Tensor = torch.Tensor
Network = Callable[..., Tensor]

# The reference's extrapolation rule: the step with 0-based index i >= this uses the previous
# raw prediction (so the first two steps are never extrapolated, although step 1 has a predecessor).
FIRST_EXTRAPOLATED_STEP = 2


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of UCGM-S. Defaults are the reference's function defaults except the gaps, which
    follow its multi-step configs; UCGM recommends schedule (1.17, 0.8, 1.1) for multi-step models.

    steps: network evaluations of the sampler without guidance (see `count_network_evaluations`).
    schedule: Kumaraswamy (a, b, c) reshaping the time grid (`time_grid`).
    boundary_gaps: (g0, g1), gaps cut at the noise end and the data end of the grid; g1 ~ 0.001-0.005
        for multi-step models, 0.2-0.8 for few-step ones.
    extrapolation: kappa, x_hat += kappa (x_hat - previous raw x_hat), same for z_hat.
    stochasticity: rho in [0, 1]; 0 deterministic, 1 consistency-style re-noising.
    order: 1, or 2 for the Heun correction (deterministic, so it needs stochasticity 0; see `sample`).
    guidance_scale: classifier-free guidance w; 1.0 is off, 0.0 is the unconditional model.
    guidance_interval: closed range of library time t (0 data, 1 noise) where guidance is applied.
    condition_on_end_time: also pass the next grid time as the network's second time,
        network(x, network_time(t_cur), labels, r=network_time(t_next)), for two-time networks that
        predict the jump from t_cur to t_next (shortcut models, ESC; see ucgm_core.systems). With
        stochasticity 0 the step is then exactly that jump, x_next = gamma(t_next) x_hat + alpha(t_next) z_hat.
    """

    steps: int = 20
    schedule: tuple[float, float, float] = (1.0, 1.0, 1.0)
    boundary_gaps: tuple[float, float] = (0.001, 0.001)
    extrapolation: float = 0.0
    stochasticity: float = 0.0
    order: int = 1
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    condition_on_end_time: bool = False

    def __post_init__(self) -> None:
        # YAML and pydantic hand over lists; keep the frozen object hashable and uniform.
        for name, length in (("schedule", 3), ("boundary_gaps", 2), ("guidance_interval", 2)):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != length:
                raise ValueError(f"{name} must be a sequence of {length} numbers, got {value!r}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ValueError(f"{name} must hold finite numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("extrapolation", "stochasticity", "guidance_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}; use 1-4 for few-step models, 20-250 for multi-step")
        if any(v <= 0 for v in self.schedule):
            raise ValueError(f"schedule entries (Kumaraswamy a, b, c) must be > 0, got {self.schedule}; use (1, 1, 1) for a uniform grid")
        g0, g1 = self.boundary_gaps
        if not (0.0 <= g0 < 1.0 and 0.0 <= g1 < 1.0 and g0 + g1 < 1.0):
            raise ValueError(
                f"boundary_gaps must be two numbers in [0, 1) with g0 + g1 < 1, got {self.boundary_gaps}; "
                "use (0.001, 0.001) for multi-step models or (0.001, 0.5) for few-step ones"
            )
        if self.extrapolation < 0:
            raise ValueError(f"extrapolation must be >= 0, got {self.extrapolation}; use 0 for none or 0.2-0.6 for multi-step models")
        if not 0.0 <= self.stochasticity <= 1.0:
            raise ValueError(f"stochasticity must be in [0, 1], got {self.stochasticity}; use 0 for multi-step or 1 for few-step models")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        if self.order == 2 and self.stochasticity > 0:
            raise ValueError(
                f"order 2 (Heun) is a deterministic correction and needs stochasticity 0, got {self.stochasticity}; "
                "set stochasticity to 0 or order to 1"
            )
        if not isinstance(self.condition_on_end_time, bool):
            raise ValueError(f"condition_on_end_time must be true or false, got {self.condition_on_end_time!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}; use 1.0 for no guidance")
        low, high = self.guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"guidance_interval must satisfy 0 <= low <= high <= 1, got {self.guidance_interval}; use (0.0, 1.0) to guide everywhere"
            )


def _interval_count(settings: SamplerSettings) -> int:
    """Grid intervals N: `steps` for order 1, ceil(steps / 2) for order 2 (2N - 1 evaluations)."""
    return settings.steps if settings.order == 1 else (settings.steps + 1) // 2


def time_grid(settings: SamplerSettings, dtype: torch.dtype = torch.float64) -> Tensor:
    """The N + 1 times t_0 > t_1 > ... > t_N = 0 visited by the sampler (N intervals).

    With N = steps (order 1) or (steps + 1) // 2 (order 2) and (g0, g1) = boundary_gaps:

        u = linspace(g0, 1 - g1, N)                 if g1 > 0
        u = linspace(g0, 1, N + 1)[:-1]             if g1 = 0 (drop u = 1, i.e. t = 0)
        u <- (1 - (1 - u^a)^b)^c                    Kumaraswamy CDF, (a, b, c) = schedule
        t = [1 - u_0, ..., 1 - u_{N-1}, 0]

    so t_0 = 1 - K(g0) (1 when g0 = 0) and the last evaluated time is 1 - K(1 - g1) when g1 > 0.
    For N = 1 the grid is [1 - K(g0), 0]. Computed in float64, returned in `dtype` on the CPU.
    """
    intervals = _interval_count(settings)
    g0, g1 = settings.boundary_gaps
    if g1 == 0.0:
        u = torch.linspace(g0, 1.0, intervals + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, intervals, dtype=torch.float64)
    a, b, c = settings.schedule
    u = (1.0 - (1.0 - u**a) ** b) ** c
    return torch.cat([1.0 - u, torch.zeros(1, dtype=torch.float64)]).to(dtype)


def count_network_evaluations(settings: SamplerSettings) -> int:
    """Number of network calls `sample` makes: `steps` for order 1; 2N - 1 with N = (steps + 1) // 2
    for order 2 (one per interval plus a Heun correction on every interval but the last), which is
    `steps` when steps is odd and steps - 1 when it is even.

    Guidance does not change the count: a guided evaluation is ONE call on a doubled batch
    (conditional rows, then unconditional rows), so its cost in rows is twice that of an unguided one.
    """
    intervals = _interval_count(settings)
    return intervals if settings.order == 1 else 2 * intervals - 1


def _standard_normal(shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator], device: torch.device) -> Tensor:
    """float64 N(0, I) of `shape`: from one generator, or row b from generator b (on its own device)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float64) for g in generator]
    return torch.stack(rows).to(device)


@torch.no_grad()
def sample(
    network: Network,
    transport: Transport,
    noise: Tensor,
    labels: Tensor | None,
    settings: SamplerSettings,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_trajectory: bool = False,
    null_label: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run UCGM-S from `noise` (the state at t_0 of `time_grid`) and return the generated sample.

    The state lives in float64; the network is called as `network(x_t, t_net, labels)` with x_t in
    the noise's dtype and `t_net = transport.network_time(t)` of shape (B,) in that dtype too.

    Step i over the interval (t_cur, t_next) = (t_i, t_{i+1}):

    1. F = network(x_i, t_cur). With guidance_scale w != 1 and t_cur in guidance_interval, one call
       on the concatenated batch [x_i; x_i] with labels [labels; null] gives F = F_u + w (F_c - F_u).
    2. (x_hat, z_hat) = transport.predictions(F, x_i, t_cur), the raw predictions.
    3. Extrapolation (kappa > 0), the reference's rule: for i >= 2 (the third step on),
       x_hat <- x_hat + kappa (x_hat - x_hat_raw_{i-1}), same for z_hat. Only raw predictions are
       remembered, never extrapolated ones.
    4. x_{i+1} = gamma(t_next) x_hat + alpha(t_next) (sqrt(1 - rho) z_hat + sqrt(rho) eps),
       eps ~ N(0, I) from `generator` (required when rho > 0).
    5. Order 2 (Heun), on every interval but the last (rho must be 0). Along the probability-flow
       ODE of any affine path dx/dt = alpha'(t) z_hat + gamma'(t) x_hat, i.e. dx = z_hat d(alpha)
       + x_hat d(gamma). Freezing the predictions at t_cur gives the first-order step as an increment,
           x_{i+1} = x_i + (alpha_n - alpha_c) z_hat + (gamma_n - gamma_c) x_hat
       (= gamma_n x_hat + alpha_n z_hat, since x_i = alpha_c z_hat + gamma_c x_hat); evaluating the
       network at that x_{i+1}, t_next gives (x_hat', z_hat'), and the trapezoid rule for the two
       integrals replaces z_hat, x_hat by (z_hat + z_hat')/2, (x_hat + x_hat')/2. For the linear
       transport this is exactly Heun's method on the velocity z_hat - x_hat. It divides by nothing,
       so it is bounded at both ends of the path. (The reference writes the step in z_hat alone,
       x_{i+1} = (gamma_n/gamma_c) x_i + (alpha_n - gamma_n alpha_c/gamma_c) z_hat, and averages z_hat;
       its correction carries a factor 1/gamma(t_cur), about 1000 at t_cur = 0.999, and diverges
       on the first interval of the default grid, so it is not used here.)
       With extrapolation the current predictions in both formulas are the extrapolated ones.

    The last step's x_{N} (t = 0) is never evaluated: the sample is the last raw x_hat, in the
    noise's dtype. With return_trajectory=True returns (sample, trajectory), the trajectory a
    tensor (count_network_evaluations + 1, *noise.shape) stacking the noise and every raw x_hat
    in evaluation order (Heun corrections included), in the noise's dtype.

    Args:
        network: callable (x_t, t_net, labels) -> F with F.shape == x_t.shape.
        transport: the transport the network was trained with.
        noise: (B, ...) initial state, usually N(0, I).
        labels: (B,) class labels or None for an unconditional network (guidance then impossible).
        settings: SamplerSettings.
        generator: for rho > 0, a torch.Generator on the noise's device, or one generator per row
            (a sequence of length B, on any device): row b's fresh noise then comes from generator b
            alone, so a sample does not depend on the other members of its batch.
        return_trajectory: also return the stacked raw predictions.
        null_label: the unconditional label; defaults to `network.num_classes`.
    """
    rho = settings.stochasticity
    if rho > 0 and generator is None:
        raise ValueError(
            f"stochasticity {rho} > 0 draws fresh noise each step: pass generator=torch.Generator(device=noise.device).manual_seed(...)"
        )
    if rho > 0 and not isinstance(generator, torch.Generator) and len(generator) != noise.shape[0]:
        raise ValueError(f"got {len(generator)} per-row generators for a batch of {noise.shape[0]}; pass one per row or a single generator")
    if labels is not None and labels.shape[:1] != noise.shape[:1]:
        raise ValueError(f"labels must have shape ({noise.shape[0]},) to match the noise batch, got {tuple(labels.shape)}")

    guided = settings.guidance_scale != 1.0
    if guided:
        if labels is None:
            raise ValueError("guidance_scale != 1 needs class labels; pass labels or set guidance_scale to 1.0")
        null_labels = torch.full_like(labels, null_label_of(network, null_label))
        guided_labels = torch.cat([labels, null_labels])
    low, high = settings.guidance_interval

    net_dtype, device = noise.dtype, noise.device
    batch = noise.shape[0]
    grid = time_grid(settings)
    times = grid.to(device)
    grid_values = grid.tolist()  # host copies for the interval test, so no device sync per step
    intervals = len(grid_values) - 1
    # Without return_trajectory only the latest raw x_hat is kept.
    trajectory: list[Tensor] = [noise]

    def evaluate(x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Raw (x_hat, z_hat) in float64 from one network call at state x (float64) and time t_i."""
        t, t_value = times[i], grid_values[i]
        x_in = x.to(net_dtype)
        t_vec = torch.full((batch,), t_value, dtype=net_dtype, device=device)
        # two-time networks read the time they jump to; one-time networks are called exactly as before
        end_time = {}
        if settings.condition_on_end_time:
            end_vec = torch.full((batch,), grid_values[i + 1], dtype=net_dtype, device=device)
            end_time = {"r": transport.network_time(end_vec)}
        if guided and low <= t_value <= high:
            doubled_end = {"r": torch.cat([end_time["r"]] * 2)} if end_time else {}
            both = network(torch.cat([x_in, x_in]), transport.network_time(torch.cat([t_vec, t_vec])), guided_labels, **doubled_end)
            conditional, unconditional = both.to(torch.float64).chunk(2)
            output = unconditional + settings.guidance_scale * (conditional - unconditional)
        else:
            output = network(x_in, transport.network_time(t_vec), labels, **end_time).to(torch.float64)
        x_hat, z_hat = transport.predictions(output, x, t)
        if not return_trajectory:
            trajectory.clear()
        trajectory.append(x_hat.to(net_dtype))
        return x_hat, z_hat

    x = noise.to(torch.float64)
    previous_raw: tuple[Tensor, Tensor] | None = None
    for i in range(intervals):
        t_cur, t_next = times[i], times[i + 1]
        x_hat, z_hat = evaluate(x, i)
        if i == intervals - 1:
            break  # the move to t = 0 is never evaluated; the sample is this raw x_hat

        raw = (x_hat, z_hat)
        if settings.extrapolation > 0 and i >= FIRST_EXTRAPOLATED_STEP:
            kappa = settings.extrapolation
            x_hat = x_hat + kappa * (x_hat - previous_raw[0])
            z_hat = z_hat + kappa * (z_hat - previous_raw[1])
        previous_raw = raw

        nxt = transport.coefficients(t_next)
        if rho > 0:
            eps = _standard_normal(x.shape, generator, device)
            x_next = nxt.gamma * x_hat + nxt.alpha * (math.sqrt(1.0 - rho) * z_hat + math.sqrt(rho) * eps)
        else:
            x_next = nxt.gamma * x_hat + nxt.alpha * z_hat

        if settings.order == 2:
            cur = transport.coefficients(t_cur)
            x_hat_next, z_hat_next = evaluate(x_next, i + 1)
            x_next = (
                x
                + (nxt.alpha - cur.alpha) * (0.5 * (z_hat + z_hat_next))
                + (nxt.gamma - cur.gamma) * (0.5 * (x_hat + x_hat_next))
            )
        x = x_next

    result = trajectory[-1]
    if return_trajectory:
        return result, torch.stack(trajectory)
    return result
