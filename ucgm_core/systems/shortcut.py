"""Shortcut models (Frans, Hafner, Levine, Abbeel 2024, arXiv 2410.12557), in our time.

The paper puts data at time 1 and integrates x_{tau + d} = x_tau + d s(x_tau, tau, d). Its path is
the linear one, so in our time (t = 1 - tau, data at 0) it is the `relinear` transport: the network
reads 1 - t and predicts x - z. A step of size d from t lands at r = t - d, and the network is called
with that end time as its second time (`call_two_time`; see ucgm_core.systems.common).

With M = `finest_steps` (a power of two) the batch is split in two (the authors' code's
bootstrap_every = 8 puts 1/8 of it into the second group):

- flow-matching rows: t uniform on {1/M, ..., 1}, r = t - 1/M (the finest step), target the
  transport's F* (x - z for relinear); these rows get label dropout for guidance.
- self-consistency rows: a big step D = 2^k / M, k = 1..log2(M), cycled over the rows so every level
  gets the same share; t uniform on the grid {D, D + 1/M, ..., 1}; s = t - D/2, r = t - D.
  With theta- the EMA target network (decay 0.999),

      F1 = theta-(x_t; t -> s),   x_s = jump(F1; x_t, t -> s),   F2 = theta-(x_s; s -> r),
      target = the F that jumps from x_t to jump(F2; x_s, s -> r) in one step,

  which for the linear path is the paper's (F1 + F2) / 2. Written with `jump` / `output_for_jump`, so
  the composition rule holds on any transport. The authors' code clips x_s and the target to
  [-target_clip, target_clip] (4 for images); 0 disables.

Loss: mean squared error over all rows (the paper's L2). Sampling: K Euler steps of size 1/K from
t = 1, each conditioned on its end time: UCGM-S with condition_on_end_time and boundary_gaps (0, 0).

Not reproduced: the authors' code also applies classifier-free guidance inside some self-consistency
rows; here they use the row's labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.sampler import SamplerSettings
from ucgm_core.transports import Transport

from ucgm_core.systems.checks import check_choice, check_fraction, check_kind, check_nonnegative_int, refuse_teacher
from ucgm_core.systems.common import (
    Network,
    ObjectiveOutput,
    RandomStateReplay,
    call_two_time,
    jump,
    live_or_target,
    noised_batch,
    output_for_jump,
    per_sample_mean_square,
    replaying,
    time_dtype,
)
from ucgm_core.systems.registry import SystemRecord, SystemSettings

Tensor = torch.Tensor


@dataclass(frozen=True)
class ShortcutSettings(SystemSettings):
    """Shortcut-model settings; defaults are the paper's (128 finest steps, 1/8 self-consistency rows)."""

    kind: Literal["shortcut"] = "shortcut"
    finest_steps: int = 128
    self_consistency_fraction: float = 0.125
    target_network: Literal["ema", "live", "frozen"] = "ema"
    target_ema_decay: float = 0.999
    target_decay_warmup: bool = True
    label_dropout: float = 0.1
    target_clip: float = 4.0

    def __post_init__(self) -> None:
        check_kind(self, "shortcut")
        check_nonnegative_int(self, "finest_steps", "the paper uses 128", minimum=2)
        if self.finest_steps & (self.finest_steps - 1):
            raise ValueError(f"finest_steps must be a power of two, got {self.finest_steps}; the paper uses 128")
        check_fraction(self, "self_consistency_fraction", "the paper uses 0.125 (one row in 8)", closed_top=False)
        check_choice(self, "target_network", ("ema", "live", "frozen"))
        check_fraction(self, "target_ema_decay", "the paper uses 0.999")
        check_fraction(self, "label_dropout", "use 0.1 for classifier-free guidance", closed_top=False)
        if not (isinstance(self.target_clip, (int, float)) and self.target_clip >= 0):
            raise ValueError(f"target_clip must be >= 0, got {self.target_clip!r}; the shortcut authors' code uses 4 (0 disables)")

    @property
    def levels(self) -> int:
        """log2(finest_steps): the number of big step sizes 2/M, 4/M, ..., 1."""
        return int(math.log2(self.finest_steps))


def self_consistency_target(
    transport: Transport,
    target_network: Network,
    x_time: Tensor,
    time: Tensor,
    middle_time: Tensor,
    end_time: Tensor,
    labels: Tensor,
    *,
    clip: float = 0.0,
    random_state: RandomStateReplay | None = None,
) -> Tensor:
    """The output that jumps from x_t at t to the end of two target-network half steps t -> s -> r.
    Call under torch.no_grad."""

    def evaluate(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
        with replaying(random_state):
            return call_two_time(target_network, transport, x, start, labels, end).to(x.dtype)

    first = evaluate(x_time, time, middle_time)
    x_middle = jump(transport, first, x_time, time, middle_time)
    if clip > 0:
        x_middle = x_middle.clamp(-clip, clip)
    second = evaluate(x_middle, middle_time, end_time)
    x_end = jump(transport, second, x_middle, middle_time, end_time)
    target = output_for_jump(transport, x_time, time, x_end, end_time)
    return target.clamp(-clip, clip) if clip > 0 else target


class ShortcutObjective:
    """Shortcut-model training (module docstring; `TrainingObjective`)."""

    def __init__(self, transport: Transport, settings: ShortcutSettings | None = None, *, teacher: Network | None = None) -> None:
        refuse_teacher(teacher, "shortcut models")
        self.settings = settings if settings is not None else ShortcutSettings()
        self.transport = transport

    @property
    def needs_target_network(self) -> bool:
        return self.settings.target_network != "live"

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        s = self.settings
        return TargetNetwork.create(s.target_network, model, s.target_ema_decay, s.target_decay_warmup)

    def extra_modules(self) -> list[nn.Module]:
        return []

    def draw_times(
        self, batch: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """(t, s, r, number of self-consistency rows): those rows come first, then the flow-matching
        rows (for which s = r = t - 1/M)."""
        finest = self.settings.finest_steps
        consistency_rows = int(round(self.settings.self_consistency_fraction * batch))
        level = torch.arange(consistency_rows, device=device) % self.settings.levels + 1
        big = 2**level  # the big step in units of 1/M
        t_index = big + (torch.rand(consistency_rows, generator=generator, device=device) * (finest - big + 1)).long()
        t_index = torch.minimum(t_index, torch.full_like(t_index, finest))
        flow_index = torch.randint(1, finest + 1, (batch - consistency_rows,), generator=generator, device=device)
        time_index = torch.cat([t_index, flow_index]).to(torch.float64)
        end_index = torch.cat([t_index - big, flow_index - 1]).to(torch.float64)
        middle_index = torch.cat([t_index - big // 2, flow_index - 1]).to(torch.float64)

        def scaled(index: Tensor) -> Tensor:
            return (index / finest).to(dtype)

        return scaled(time_index), scaled(middle_index), scaled(end_index), consistency_rows

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
        jump_network = live_or_target(network, target_network, settings.target_network)
        time, middle, end, rows = self.draw_times(x.shape[0], generator, x.device, time_dtype(x))
        # label dropout on the flow-matching rows only (they come last)
        batch = noised_batch(
            transport, x, labels, time,
            generator=generator, null_label=null_label_of(network, num_classes), label_dropout=settings.label_dropout,
            eligible_rows=x.shape[0] - rows,
        )
        x_time, noise, used_labels = batch.x_time, batch.noise, batch.labels

        random_state = RandomStateReplay(x.device)
        output = call_two_time(network, transport, x_time, time, used_labels, end)
        with torch.no_grad():
            flow_target = transport.ideal_output(x[rows:], noise[rows:], time[rows:])
            pieces = [flow_target]
            if rows > 0:
                consistency_target = self_consistency_target(
                    transport, jump_network, x_time[:rows], time[:rows], middle[:rows], end[:rows],
                    used_labels[:rows], clip=settings.target_clip, random_state=random_state,
                )
                pieces.insert(0, consistency_target.to(flow_target.dtype))
            target = torch.cat(pieces)

        errors = per_sample_mean_square(output - target)
        loss = errors.mean()
        detached = errors.detach()
        metrics = {
            "loss": loss.detach(),
            "flow_matching_mse": detached[rows:].mean() if rows < x.shape[0] else torch.tensor(0.0),
            "self_consistency_mse": detached[:rows].mean() if rows > 0 else torch.tensor(0.0),
            "mean_time": time.mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)


def sampler_settings(steps: int = 1) -> SamplerSettings:
    """K Euler steps of size 1/K from t = 1, each network call told its end time."""
    return SamplerSettings(steps=steps, boundary_gaps=(0.0, 0.0), stochasticity=0.0, condition_on_end_time=True)


SYSTEM = SystemRecord(
    kind="shortcut",
    settings=ShortcutSettings,
    objective=ShortcutObjective,
    default_transport="relinear",
    two_time_network=True,
)
