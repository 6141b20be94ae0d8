"""Exponential moving averages of a network's weights, and the stop-gradient target network theta-.

`ModelEMA` keeps a detached copy of a module whose parameters follow

    ema <- decay * ema + (1 - decay) * param        (one fused `torch._foreach_lerp_` per update)

and whose buffers (batch-norm statistics, fixed embeddings) are copied from the online module.

Decay warm-up (the UCGM reference's schedule, optional): the decay used by an update starts at 0,
so the first update copies the online weights exactly, and after every update moves toward the
target decay by

    d <- d + (1 - d) * (target - d) / 2,

(d = 0, 0.4995, 0.749, ... for target 0.999). While the gap target - d is much larger than
1 - target it shrinks like 2 / n, so d ~ 1 - 2/n after n updates (an average over roughly the
last n/2 steps); once it is comparable it shrinks geometrically by a factor 1 - (1 - target)/2 per
update. The average therefore does not remember the random initialisation for thousands of steps.

Precision: parameters stored in a low-precision float type (bfloat16, float16) are accumulated in
a float32 shadow copy, because a 0.001-weighted step is below bfloat16's resolution and would be
rounded away; after each update the shadow is copied (rounded) into `module`, so `module` keeps the
online model's dtypes and can be evaluated exactly like it. float32 and float64 parameters are
averaged in place with no extra memory.

`TargetNetwork` is the policy for theta- in the UCGM objective:

- "ema": the EMA copy above (the reference's `ema_decay_rate` in (0, 1)),
- "live": the online module itself, evaluated under no_grad (reference `ema_decay_rate = 0`);
  nothing is copied,
- "frozen": a copy taken at creation and never updated (reference `ema_decay_rate = 1`, used when
  few-step training starts from a multi-step checkpoint).

Copies keep the training/eval mode of the module they were copied from.

Example::

    target = TargetNetwork.create("ema", model, decay=0.999, warmup=True)
    for batch in loader:
        output = objective(model, target.module(model), x, labels, generator=generator)
        output.loss.backward(); optimizer.step(); optimizer.zero_grad()
        target.update(model)
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

Tensor = torch.Tensor
TargetNetworkPolicy = Literal["ema", "live", "frozen"]

_LOW_PRECISION_FLOATS = (torch.bfloat16, torch.float16)
_WARMUP_APPROACH_FRACTION = 0.5  # the reference moves half of (1 - d)(target - d) per update


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}; typical values are 0.999-0.9999")
    return decay


class ModelEMA:
    """A detached exponential moving average of `model`'s parameters (see the module docstring).

    Args:
        model: the online module to average (pass the unwrapped module, not a DDP/DeepSpeed wrapper).
        decay: the target decay; `ema = decay * ema + (1 - decay) * param`.
        warmup: if True the decay used starts at 0 and approaches `decay` by
            d <- d + (1 - d)(decay - d) / 2 after each update; if False `decay` is used from the start.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.module: nn.Module = copy.deepcopy(model).requires_grad_(False)
        self._decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self.current_decay = 0.0 if self.warmup else self._decay
        self.updates = 0
        self._parameter_names = [name for name, _ in self.module.named_parameters()]
        self._buffer_names = [name for name, _ in self.module.named_buffers()]
        parameters = dict(self.module.named_parameters())
        self._float_names = [n for n in self._parameter_names if parameters[n].is_floating_point()]
        self._other_names = [n for n in self._parameter_names if not parameters[n].is_floating_point()]
        # float32 shadows for low-precision parameters; other floats are averaged in place.
        self._shadows: dict[str, Tensor] = {
            name: parameters[name].detach().float().clone()
            for name in self._float_names
            if parameters[name].dtype in _LOW_PRECISION_FLOATS
        }

    @property
    def decay(self) -> float:
        """The target decay. Setting it keeps the warm-up going toward the new value
        (or, without warm-up, uses it from the next update)."""
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._decay = _check_decay(value)
        if not self.warmup:
            self.current_decay = self._decay

    def _accumulators(self) -> list[Tensor]:
        parameters = dict(self.module.named_parameters())
        return [self._shadows.get(name, parameters[name]) for name in self._float_names]

    @staticmethod
    def _lookup(named: dict[str, Tensor], names: list[str], kind: str) -> list[Tensor]:
        try:
            return [named[name] for name in names]
        except KeyError as error:
            raise KeyError(
                f"{kind} {error.args[0]!r} of the EMA copy is missing from the model passed to update(); "
                "pass the same (unwrapped) module the EMA was created from"
            ) from None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- current_decay * ema + (1 - current_decay) * param; buffers copied; then the
        warm-up (if on) moves current_decay toward the target decay."""
        sources = self._lookup(dict(model.named_parameters()), self._float_names, "parameter")
        accumulators = self._accumulators()
        sources = [s.detach().to(a.dtype) for s, a in zip(sources, accumulators)]
        if accumulators:
            # lerp_(end, w): a + w (end - a) = (1 - w) a + w end, with w = 1 - decay.
            torch._foreach_lerp_(accumulators, sources, 1.0 - self.current_decay)
        if self._shadows:
            parameters = dict(self.module.named_parameters())
            torch._foreach_copy_([parameters[n] for n in self._shadows], list(self._shadows.values()))
        self._copy_exact(model)
        self.updates += 1
        if self.warmup:
            gap = (1.0 - self.current_decay) * (self._decay - self.current_decay)
            self.current_decay += _WARMUP_APPROACH_FRACTION * gap

    def _copy_exact(self, model: nn.Module) -> None:
        """Buffers and non-float parameters are not averaged; they are copied."""
        own_parameters = dict(self.module.named_parameters())
        destinations = [own_parameters[n] for n in self._other_names]
        sources = self._lookup(dict(model.named_parameters()), self._other_names, "parameter")
        own_buffers = dict(self.module.named_buffers())
        destinations += [own_buffers[n] for n in self._buffer_names]
        sources += self._lookup(dict(model.named_buffers()), self._buffer_names, "buffer")
        if destinations:
            torch._foreach_copy_(destinations, [s.detach() for s in sources])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, float32 shadows, target and current decay."""
        return {
            "module": self.module.state_dict(),
            "shadows": {name: shadow.clone() for name, shadow in self._shadows.items()},
            "decay": self._decay,
            "current_decay": self.current_decay,
            "warmup": self.warmup,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self._decay = _check_decay(state["decay"])
        self.current_decay = float(state["current_decay"])
        self.warmup = bool(state["warmup"])
        self.updates = int(state.get("updates", 0))
        parameters = dict(self.module.named_parameters())
        saved_shadows = state.get("shadows", {})
        for name, shadow in self._shadows.items():
            # a checkpoint without shadows (e.g. written from a float32 model) restarts them
            # from the stored low-precision weights.
            source = saved_shadows.get(name, parameters[name])
            shadow.copy_(source.to(device=shadow.device, dtype=shadow.dtype))


class TargetNetwork:
    """The stop-gradient network theta- of the objective. Build one with `TargetNetwork.create`."""

    policy: TargetNetworkPolicy

    @staticmethod
    def create(
        policy: TargetNetworkPolicy, model: nn.Module, decay: float = 0.999, warmup: bool = True
    ) -> TargetNetwork:
        """policy "ema": a `ModelEMA` of `model` (decay, warmup as there); "live": `model` itself
        (nothing copied); "frozen": a detached copy of `model` as it is now."""
        if policy == "ema":
            return MovingAverageTargetNetwork(model, decay, warmup)
        if policy == "live":
            return LiveTargetNetwork()
        if policy == "frozen":
            return FrozenTargetNetwork(model)
        raise ValueError(f"target network policy must be one of 'ema', 'live', 'frozen', got {policy!r}")

    def module(self, online: nn.Module) -> nn.Module:
        """The module to evaluate (under no_grad) as theta- for the current step."""
        raise NotImplementedError

    def update(self, online: nn.Module) -> None:
        """Called after each optimiser step; only the EMA policy changes anything."""

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.policy:
            raise ValueError(
                f"target network state was saved with policy {state.get('policy')!r} but this one is "
                f"{self.policy!r}; create the target network with the saved policy"
            )


class MovingAverageTargetNetwork(TargetNetwork):
    """theta- = an exponential moving average of the online weights."""

    policy: TargetNetworkPolicy = "ema"

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.average = ModelEMA(model, decay=decay, warmup=warmup)

    def module(self, online: nn.Module) -> nn.Module:
        return self.average.module

    def update(self, online: nn.Module) -> None:
        self.average.update(online)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.average.load_state_dict(state["average"])


class LiveTargetNetwork(TargetNetwork):
    """theta- = the online weights themselves (the objective evaluates them under no_grad)."""

    policy: TargetNetworkPolicy = "live"

    def module(self, online: nn.Module) -> nn.Module:
        return online


class FrozenTargetNetwork(TargetNetwork):
    """theta- = the weights of the module given at creation, never updated."""

    policy: TargetNetworkPolicy = "frozen"

    def __init__(self, model: nn.Module) -> None:
        self.frozen = copy.deepcopy(model).requires_grad_(False)

    def module(self, online: nn.Module) -> nn.Module:
        return self.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "module": self.frozen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.frozen.load_state_dict(state["module"])
