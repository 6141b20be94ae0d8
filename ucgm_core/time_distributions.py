"""Training time distributions: where on the path (t = 0 data, t = 1 noise) a batch is trained.

Each distribution is a frozen dataclass with a `kind` discriminator first, so a config schema can
embed the union `TimeDistribution` and pick the class by `kind`. All of them draw with an explicit
`torch.Generator` and return a tensor of shape (n,) with values in [0, 1]:

    dist = BetaTime(a=2.4, b=2.4)                 # UCGM time_dist_ctrl = [2.4, 2.4, 1]
    g = torch.Generator().manual_seed(0)
    t = dist.sample(256, generator=g)             # (256,), float32, on the generator's device

| kind               | draw                                                        | used by            |
|--------------------|-------------------------------------------------------------|--------------------|
| `beta`             | t ~ Beta(a, b), t <- clamp(scale * t, 0, 1)                 | UCGM [a, b, c]     |
| `logit_normal`     | t = sigmoid(u), u ~ N(mean, std^2)                          | ESC (-0.4, 1)      |
| `arctan_lognormal` | t = arctan(exp(tau) / sigma_data) / (pi/2), tau ~ N(m, s^2) | sCM (-1.0, 1.6)    |
| `uniform`          | t ~ U(low, high)                                            |                    |
| `discrete`         | t uniform on {1/N, 2/N, ..., 1}                             | shortcut, MCM grids|
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch

Tensor = torch.Tensor

# Seeds handed to the CPU generator used for Beta draws; any value below 2**63 is a valid seed.
_SEED_UPPER_BOUND = 2**62


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Draw in float64 when float64 is asked for, otherwise in float32 (then cast), so that
    half-precision requests do not lose resolution inside the transforms."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_device(device: torch.device | str | None, generator: torch.Generator) -> torch.device:
    return torch.device(device) if device is not None else generator.device


def _check_kind(obj: object, expected: str) -> None:
    kind = getattr(obj, "kind")
    if kind != expected:
        raise ValueError(f"kind must be {expected!r} for {type(obj).__name__}, got {kind!r}; leave kind at its default")


def _check_finite(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_positive(obj: object, *names: str, fix: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}{'; ' + fix if fix else ''}")


def _normal(
    n: int, mean: float, std: float, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    return torch.randn(n, generator=generator, device=device, dtype=dtype) * std + mean


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


@dataclass(frozen=True)
class BetaTime:
    """t ~ Beta(a, b), then t <- clamp(scale * t, 0, 1): UCGM's `time_dist_ctrl = [a, b, scale]`.

    Beta(1, 1) is uniform; scale > 1 puts an atom of mass 1 - I_{1/scale}(a, b) at t = 1.
    torch's Beta sampler takes no generator, so one integer is drawn from `generator` and used to
    seed the CPU default generator inside `torch.random.fork_rng`, which restores it afterwards:
    the draw is a deterministic function of `generator` and leaves the global RNG untouched
    (not thread-safe while it runs, like any use of the default generator)."""

    kind: Literal["beta"] = "beta"
    a: float = 1.0
    b: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_kind(self, "beta")
        _check_finite(self, "a", "b", "scale")
        _check_positive(self, "a", "b", fix="Beta shape parameters are positive; use a = b = 1 for uniform")
        _check_positive(self, "scale", fix="use 1.0 for no rescaling")

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        _check_count(n)
        device = _resolve_device(device, generator)
        seed = int(torch.randint(0, _SEED_UPPER_BOUND, (1,), generator=generator, device=generator.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            concentration = torch.tensor([self.a, self.b], dtype=torch.float64)
            draws = torch.distributions.Beta(concentration[0], concentration[1]).sample((n,))
        t = torch.clamp(self.scale * draws, 0.0, 1.0)
        return t.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class LogitNormalTime:
    """t = sigmoid(u), u ~ N(mean, std^2) (ESC uses mean -0.4, std 1)."""

    kind: Literal["logit_normal"] = "logit_normal"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        _check_kind(self, "logit_normal")
        _check_finite(self, "mean", "std")
        _check_positive(self, "std", fix="use 1.0 for the standard logit-normal")

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        _check_count(n)
        u = _normal(n, self.mean, self.std, generator, _resolve_device(device, generator), _compute_dtype(dtype))
        return torch.sigmoid(u).to(dtype)


@dataclass(frozen=True)
class ArctanLogNormalTime:
    """sCM's time: tau ~ N(mean, std^2) is a log noise-to-data ratio, the TrigFlow angle is
    arctan(exp(tau) / sigma_data), and t = angle / (pi/2) maps the angle in [0, pi/2] to [0, 1].
    sCM uses (mean, std) = (-1.0, 1.6) on ImageNet and (-1.0, 1.4) on CIFAR-10, sigma_data 0.5."""

    kind: Literal["arctan_lognormal"] = "arctan_lognormal"
    mean: float = -1.0
    std: float = 1.6
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        _check_kind(self, "arctan_lognormal")
        _check_finite(self, "mean", "std", "sigma_data")
        _check_positive(self, "std", fix="sCM uses 1.6 (ImageNet) or 1.4 (CIFAR-10)")
        _check_positive(self, "sigma_data", fix="sCM uses 0.5")

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        _check_count(n)
        tau = _normal(n, self.mean, self.std, generator, _resolve_device(device, generator), _compute_dtype(dtype))
        angle = torch.atan(torch.exp(tau) / self.sigma_data)
        return torch.clamp(angle / (math.pi / 2), 0.0, 1.0).to(dtype)


@dataclass(frozen=True)
class UniformTime:
    """t ~ U(low, high) with 0 <= low < high <= 1."""

    kind: Literal["uniform"] = "uniform"
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        _check_kind(self, "uniform")
        _check_finite(self, "low", "high")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(
                f"low and high must satisfy 0 <= low < high <= 1, got low={self.low}, high={self.high}; "
                "use low=0, high=1 for the whole path"
            )

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        _check_count(n)
        u = torch.rand(n, generator=generator, device=_resolve_device(device, generator), dtype=_compute_dtype(dtype))
        return (self.low + (self.high - self.low) * u).to(dtype)


@dataclass(frozen=True)
class DiscreteTime:
    """t uniform on the grid {1/N, 2/N, ..., 1} with N = num_points (shortcut / MCM grids);
    t = 0, the data itself, is never drawn."""

    kind: Literal["discrete"] = "discrete"
    num_points: int = 128

    def __post_init__(self) -> None:
        _check_kind(self, "discrete")
        if not isinstance(self.num_points, int) or isinstance(self.num_points, bool) or self.num_points < 1:
            raise ValueError(f"num_points must be an int >= 1, got {self.num_points!r}; shortcut models use 128")

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        _check_count(n)
        k = torch.randint(1, self.num_points + 1, (n,), generator=generator, device=_resolve_device(device, generator))
        return (k.to(torch.float64) / self.num_points).to(dtype)


TimeDistribution = Union[BetaTime, LogitNormalTime, ArctanLogNormalTime, UniformTime, DiscreteTime]

TIME_DISTRIBUTIONS: dict[str, type] = {
    "beta": BetaTime,
    "logit_normal": LogitNormalTime,
    "arctan_lognormal": ArctanLogNormalTime,
    "uniform": UniformTime,
    "discrete": DiscreteTime,
}
