"""What the training systems share at run time: the training-objective interface, the noised
batch every objective opens with, RNG replay, DDIM-style jumps written against any transport,
forward-mode derivatives, per-sample losses, warm-ups and sCM's learned loss weight. (What their
settings share, the range checks, is `checks.py`.)

Time convention as everywhere: t = 0 data, t = 1 noise; x_t = alpha(t) z + gamma(t) x.

**The batch.** Every objective draws its times from the caller's generator first (one time, or
several for the multi-time systems), then `noised_batch` draws z ~ N(0, I) from the same generator,
puts the data on the path and drops labels: the last round(p n) of the last n rows (n = the batch
unless a system trains only part of it with dropout) get the null label `num_classes`.

**The two-time network.** Shortcut models and ESC predict a jump from t to an earlier time r <= t.
They are called as `network(x_t, network_time(t), labels, r=network_time(r))`: the second time is
the *end time* of the jump in the network's own time convention (a one-time network ignores it).
The shortcut paper conditions on the step size d = t - r (embedding log2(1/d)); given t that is the
same information, and it is how the ESC reference code runs shortcut models.

**Jumps.** Any output F of a transport gives the pair (x_hat, z_hat) with x_t = alpha z_hat + gamma x_hat
(`Transport.predictions`). Keeping both predictions fixed and moving to time r is the DDIM step

    jump(F; x_t, t -> r) = gamma(r) x_hat + alpha(r) z_hat,

which for the linear transport is the Euler / average-velocity step x_r = x_t - (t - r) F and for
vp_cosine x-prediction is DDIM. Both predictions are affine in F, so the jump is affine in F and can
be inverted: `output_for_jump` returns the F that lands on a given x_r (invDDIM in Multistep CMs,
the averaged velocity of two half steps in shortcut models).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.time_distributions import TimeDistribution
from ucgm_core.transports import Transport, broadcast_time

Tensor = torch.Tensor
Network = Callable[..., Tensor]


@dataclass
class ObjectiveOutput:
    """loss: scalar, differentiable w.r.t. the online network only; metrics: detached scalars."""

    loss: Tensor
    metrics: dict[str, Tensor]


@runtime_checkable
class TrainingObjective(Protocol):
    """What the training loop needs from an objective (UnifiedObjective and every system objective).

    Loop contract::

        objective = build_objective(settings, transport, teacher=teacher_or_None)
        target = objective.create_target_network(model) if objective.needs_target_network else None
        extra = [m.to(device) for m in objective.extra_modules()]       # e.g. sCM's w(t)
        optimizer = Optimizer([*model.parameters(), *(p for m in extra for p in m.parameters())])
        for step in range(steps):
            out = objective(model, target.module(model) if target else None, x, labels,
                            generator=generator, step=step)
            out.loss.backward(); optimizer.step(); optimizer.zero_grad()
            if target: target.update(model)

    `step` is the optimiser step count (0 first) used by warm-ups; None means fully warmed up.
    Extra modules are trained with the network and must be checkpointed with it.
    """

    @property
    def needs_target_network(self) -> bool: ...

    def create_target_network(self, model: nn.Module) -> TargetNetwork: ...

    def extra_modules(self) -> list[nn.Module]: ...

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
    ) -> ObjectiveOutput: ...


# --------------------------------------------------------------------------- the batch


class RandomStateReplay:
    """The CPU RNG state (and the CUDA one of `device`, if it is a CUDA device) at capture time.

    Captured just before the online forward pass; `replayed()` sets the captured state for the
    duration of the block and then puts back the state that was current before it, so every extra
    forward pass draws the online pass's dropout masks and replays do not move the global RNG."""

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


def replaying(random_state: RandomStateReplay | None) -> contextlib.AbstractContextManager[None]:
    """`random_state.replayed()`, or a block that changes nothing when there is no state to replay."""
    return random_state.replayed() if random_state is not None else contextlib.nullcontext()


def drop_labels(
    labels: Tensor, probability: float, null_label: int, *, eligible_rows: int | None = None
) -> tuple[Tensor, int]:
    """A copy of `labels` whose last round(probability * n) rows are `null_label`, and that number;
    n = eligible_rows (the last rows of the batch; all of them by default). Python's round, as the
    reference code; zero rows are dropped when it rounds to 0 (the reference's `c[-0:]` drops all)."""
    eligible = labels.shape[0] if eligible_rows is None else eligible_rows
    number_dropped = round(probability * eligible)
    dropped = labels.clone()
    if number_dropped > 0:
        dropped[labels.shape[0] - number_dropped :] = null_label
    return dropped, number_dropped


def time_dtype(x: Tensor) -> torch.dtype:
    """The dtype times are drawn in: float64 for float64 data, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def draw_time(distribution: TimeDistribution, x: Tensor, generator: torch.Generator, minimum: float = 0.0) -> Tensor:
    """t ~ distribution, shape (B,), from `generator` on x's device in time_dtype(x); t <- max(t, minimum)
    when minimum > 0."""
    time = distribution.sample(x.shape[0], generator=generator, device=x.device, dtype=time_dtype(x))
    return time.clamp(min=minimum) if minimum > 0.0 else time


@dataclass(frozen=True)
class NoisedBatch:
    """One training batch on the path. data x, noise z, time t (B,), x_time = alpha(t) z + gamma(t) x;
    labels with their last `number_dropped` rows set to `null_label`."""

    data: Tensor
    noise: Tensor
    time: Tensor
    x_time: Tensor
    labels: Tensor
    null_label: int
    number_dropped: int


def noised_batch(
    transport: Transport,
    x: Tensor,
    labels: Tensor,
    time: Tensor,
    *,
    generator: torch.Generator,
    null_label: int,
    label_dropout: float,
    eligible_rows: int | None = None,
) -> NoisedBatch:
    """The batch at the times `time` the caller has just drawn from `generator`: z ~ N(0, I) shaped
    like x from the same generator, x_t = alpha(t) z + gamma(t) x, and `drop_labels` with
    `label_dropout` over the last `eligible_rows` rows (all by default). The caller's tensors are
    not modified."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    dropped, number_dropped = drop_labels(labels, label_dropout, null_label, eligible_rows=eligible_rows)
    x_time = transport.interpolate(x, noise, time)
    return NoisedBatch(x, noise, time, x_time, dropped, null_label, number_dropped)


def require_target_network(target_network: Network | None, needed: bool, why: str) -> None:
    """The objective was called without the target network theta- its settings need."""
    if needed and target_network is None:
        raise ValueError(
            f"target_network is None but {why}; pass target.module(model) with "
            "target = objective.create_target_network(model)"
        )


def live_or_target(network: Network, target_network: Network | None, policy: str) -> Network:
    """theta- under a `target_network` policy: the online network itself for "live" (the caller
    evaluates it under no_grad), else the target network, which must then be given."""
    if policy == "live":
        return network
    require_target_network(target_network, True, f"target_network is {policy!r}")
    return target_network


def row_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean (B,) row mask shaped to broadcast against a (B, ...) tensor."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def warmup_ratio(step: int | None, warmup_steps: int) -> float:
    """min(1, step / warmup_steps); 1 when step is None or warmup_steps is 0."""
    if step is None or warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


# --------------------------------------------------------------------------- jumps


def call_two_time(
    network: Network, transport: Transport, x: Tensor, time: Tensor, labels: Tensor, end_time: Tensor
) -> Tensor:
    """network(x, network_time(t), labels, r=network_time(r)) with per-sample times of shape (B,)."""
    return network(x, transport.network_time(time), labels, r=transport.network_time(end_time))


def jump(transport: Transport, output: Tensor, x_time: Tensor, time: Tensor, end_time: Tensor) -> Tensor:
    """x_r = gamma(r) x_hat + alpha(r) z_hat with (x_hat, z_hat) = predictions(F, x_t, t)."""
    x_hat, z_hat = transport.predictions(output, x_time, time)
    end = transport.coefficients(broadcast_time(end_time, x_time))
    return end.gamma * x_hat + end.alpha * z_hat


def ddim_step(transport: Transport, x_hat: Tensor, x_time: Tensor, time: Tensor, end_time: Tensor) -> Tensor:
    """DDIM from a data prediction: z_hat = (x_t - gamma(t) x_hat) / alpha(t),
    x_r = gamma(r) x_hat + alpha(r) z_hat (Multistep CMs eq. 4 in our coefficients)."""
    now = transport.coefficients(broadcast_time(time, x_time))
    end = transport.coefficients(broadcast_time(end_time, x_time))
    z_hat = (x_time - now.gamma * x_hat) / now.alpha
    return end.gamma * x_hat + end.alpha * z_hat


def inverse_ddim(transport: Transport, x_end: Tensor, x_time: Tensor, time: Tensor, end_time: Tensor) -> Tensor:
    """The data prediction x with ddim_step(x; x_t, t -> r) = x_r (Multistep CMs eq. 5):
    x = (x_r - (alpha(r) / alpha(t)) x_t) / (gamma(r) - gamma(t) alpha(r) / alpha(t)). Needs r != t."""
    now = transport.coefficients(broadcast_time(time, x_time))
    end = transport.coefficients(broadcast_time(end_time, x_time))
    ratio = end.alpha / now.alpha
    return (x_end - ratio * x_time) / (end.gamma - now.gamma * ratio)


def output_for_jump(transport: Transport, x_time: Tensor, time: Tensor, x_end: Tensor, end_time: Tensor) -> Tensor:
    """The network output F with jump(F; x_t, t -> r) = x_r: the F whose data prediction is
    inverse_ddim(x_r; x_t, t -> r) at x_t. For the linear transport F = (x_t - x_r) / (t - r)."""
    x_hat = inverse_ddim(transport, x_end, x_time, time, end_time)
    now = transport.coefficients(broadcast_time(time, x_time))
    z_hat = (x_time - now.gamma * x_hat) / now.alpha
    return transport.output_from_predictions(x_hat, z_hat, time)


# --------------------------------------------------------------------------- derivatives


def forward_derivative(
    function: Callable[[Tensor, Tensor], Tensor],
    point: tuple[Tensor, Tensor],
    direction: tuple[Tensor, Tensor],
    random_state: RandomStateReplay | None = None,
) -> tuple[Tensor, Tensor]:
    """(f(x, t), d/ds f(x + s v, t + s w) at s = 0) by torch.func.jvp: the total derivative of
    f along the direction (v, w). Dropout replays `random_state` so it draws the online masks."""
    with replaying(random_state):
        return torch.func.jvp(function, point, direction)


# --------------------------------------------------------------------------- per-sample losses


def per_sample_mean_square(difference: Tensor) -> Tensor:
    """mean over all but the batch axis of difference^2, in at least float32, shape (B,)."""
    compute = difference.to(torch.promote_types(difference.dtype, torch.float32))
    return compute.pow(2).flatten(1).mean(dim=1)


def per_sample_rms(value: Tensor) -> Tensor:
    """sqrt(mean over all but the batch axis of value^2), shaped to broadcast against value."""
    return per_sample_mean_square(value).sqrt().to(value.dtype).reshape(-1, *([1] * (value.ndim - 1)))


def pseudo_huber(output: Tensor, target: Tensor, constant: float = 0.0) -> Tensor:
    """sqrt(mean((F - target)^2) + c^2) - c per sample, shape (B,), computed in at least float32
    (both cast before the difference). With c = 0 a per-sample RMSE; large c tends to MSE / (2c)."""
    compute_dtype = torch.promote_types(output.dtype, torch.float32)
    squared = per_sample_mean_square(output.to(compute_dtype) - target.to(compute_dtype))
    return torch.sqrt(squared + constant**2) - constant


# --------------------------------------------------------------------------- learned weighting


class AdaptiveWeight(nn.Module):
    """sCM's learned loss weight w_phi (Lu & Song 2024, sec. 4.2; EDM2's uncertainty weighting):
    one linear layer on fixed Fourier features of the time(s),

        w(t[, r]) = b + sum_k a_k cos(k pi t) + c_k sin(k pi t) [+ same for r],   k = 1..frequencies,

    zero-initialised so training starts with w = 0. Per sample the weighted loss is
    exp(-w) * loss + w, minimised over w at w = log(loss): the weight learns the inverse of the
    loss level at each time, balancing the times. (The paper writes exp(w)/D |.|^2 - w, the same
    with w -> -w.) Its parameters are not part of the network: add them to the optimiser.
    """

    def __init__(self, times: int = 1, frequencies: int = 16) -> None:
        super().__init__()
        if times not in (1, 2) or frequencies < 1:
            raise ValueError(f"AdaptiveWeight takes 1 or 2 times and >= 1 frequencies, got {times}, {frequencies}")
        self.times = times
        self.register_buffer("frequencies", math.pi * torch.arange(1, frequencies + 1, dtype=torch.float32))
        self.linear = nn.Linear(2 * frequencies * times, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, time: Tensor) -> Tensor:
        phase = time.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)

    def forward(self, time: Tensor, end_time: Tensor | None = None) -> Tensor:
        """w of shape (B,) in the layer's dtype."""
        parts = [self.features(time.detach())]
        if self.times == 2:
            parts.append(self.features((time if end_time is None else end_time).detach()))
        return self.linear(torch.cat(parts, dim=1).to(self.linear.weight.dtype)).squeeze(1)


def adaptively_weighted(losses: Tensor, weight: AdaptiveWeight | None, time: Tensor, end_time: Tensor | None = None) -> Tensor:
    """exp(-w) * loss + w per sample when a learned weight is given, else the loss itself."""
    if weight is None:
        return losses
    log_weight = weight(time, end_time).to(losses.dtype)
    return torch.exp(-log_weight) * losses + log_weight
