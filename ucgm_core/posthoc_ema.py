"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): choose the EMA length after training, without retraining.

A power-function EMA of exponent gamma averages the weights theta(tau) seen up to step t as

    theta_gamma(t) = integral_0^t  p_{gamma,t}(tau) theta(tau) d tau,   p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),

which an EMA with the step-dependent decay beta(t) = (1 - 1/t)^(gamma + 1) follows (t = 1, 2, ...:
the first update copies the weights). Its length is given as sigma_rel, the standard deviation of
p relative to t:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

Training keeps two such averages (EDM2: sigma_rel 0.05 and 0.10) and snapshots of both every few
steps. A snapshot i (gamma_i, t_i) is a known weighting p_i of the training trajectory, so the
average for any other (gamma_r, t_r) is approximated by the combination sum_i x_i snapshot_i whose
weighting is closest to p_r in L2 over tau:

    A x = b,   A_ij = <p_i, p_j>,   b_i = <p_i, p_r>,

solved by least squares (A is ill-conditioned when snapshots are close). Then
theta_r = sum_i x_i theta_i, parameter by parameter. EDM2 takes the inner products of the
continuous p; we take those of the discrete weightings the EMAs actually apply,
w(tau) = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) for the weights after update tau <= t,
which is exact at any step count; the continuous form approximates it, closely once the steps
are many.

Example::

    averages = [PowerFunctionEMA(model, 0.05), PowerFunctionEMA(model, 0.10)]
    ... after each optimiser step: for a in averages: a.update(model)
    ... every N steps: snapshots.append(Snapshot(a.gamma, step, a.state_dict_of_weights()))
    weights = reconstruct(snapshots, sigma_rel=0.08)      # a state dict for the network
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ucgm_core.ema import ModelEMA

Tensor = torch.Tensor


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power function whose relative standard deviation is sigma_rel:
    the root above -1 of sigma^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1) = 0 (a cubic in gamma)."""
    if not 0 < sigma_rel < 12**-0.5:  # gamma -> -1 gives sigma_rel -> 1/sqrt(12)
        raise ValueError(f"sigma_rel must lie in (0, {12**-0.5:.4f}), got {sigma_rel}")
    s2 = sigma_rel**2
    # s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    return float(max(real))


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


class PowerFunctionEMA:
    """A power-function EMA of a module's weights: update t uses decay (1 - 1/t)^(gamma + 1)."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.average = ModelEMA(model, decay=0.0, warmup=False)

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def update(self, model: nn.Module) -> None:
        t = self.average.updates + 1
        self.average.current_decay = (1.0 - 1.0 / t) ** (self.gamma + 1.0)
        self.average.update(model)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rel": self.sigma_rel, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if abs(float(state["sigma_rel"]) - self.sigma_rel) > 1e-12:
            raise ValueError(f"a power-function EMA of sigma_rel {state['sigma_rel']} cannot resume one of {self.sigma_rel}")
        self.average.load_state_dict(state["average"])


@dataclass
class Snapshot:
    """The weights of one power-function EMA (exponent gamma) after `step` updates."""

    gamma: float
    step: int
    weights: dict[str, Tensor]


def _discrete_weights(gamma: float, horizon: int) -> np.ndarray:
    """d(tau) = (tau/T)^(gamma+1) - ((tau-1)/T)^(gamma+1) for tau = 1..T (T = horizon): the EMA of
    update t weighs the weights after update tau <= t by d(tau) / (t/T)^(gamma+1), exactly (the
    decays telescope: prod_{s=tau+1..t} (1 - 1/s)^(gamma+1) = (tau/t)^(gamma+1))."""
    tau = np.arange(1, horizon + 1, dtype=np.float64)
    return np.exp((gamma + 1) * np.log(tau / horizon)) - np.exp((gamma + 1) * np.log(np.maximum(tau - 1, 0) / horizon + 1e-300))


def _inner_products(profiles_a: list[tuple[float, int]], profiles_b: list[tuple[float, int]]) -> np.ndarray:
    """<w_a, w_b> = sum_tau w_a(tau) w_b(tau) of the exact discrete weightings of EMAs (gamma, step),
    from prefix sums of d_a d_b per pair of distinct gammas (O(T) each, then O(1) per pair)."""
    horizon = int(max(t for _, t in profiles_a + profiles_b))
    gammas = sorted({g for g, _ in profiles_a + profiles_b})
    weights = {g: _discrete_weights(g, horizon) for g in gammas}
    prefix = {(ga, gb): np.cumsum(weights[ga] * weights[gb]) for ga in gammas for gb in gammas}
    result = np.empty((len(profiles_a), len(profiles_b)))
    for i, (ga, ta) in enumerate(profiles_a):
        for j, (gb, tb) in enumerate(profiles_b):
            scale = (ga + 1) * np.log(ta / horizon) + (gb + 1) * np.log(tb / horizon)
            result[i, j] = prefix[ga, gb][min(ta, tb) - 1] * np.exp(-scale)
    return result


def reconstruction_coefficients(snapshots: list[tuple[float, int]], sigma_rel: float, step: int | None = None) -> np.ndarray:
    """x of the least-squares fit of the EMA (sigma_rel, step) (default: the last snapshot's
    step) by the snapshots' EMAs, each (gamma, step)."""
    if not snapshots:
        raise ValueError("no EMA snapshots to reconstruct from")
    target_step = int(step if step is not None else max(t for _, t in snapshots))
    profiles = [(float(g), int(t)) for g, t in snapshots]
    matrix = _inner_products(profiles, profiles)
    vector = _inner_products(profiles, [(sigma_rel_to_gamma(sigma_rel), target_step)])[:, 0]
    coefficients, *_ = np.linalg.lstsq(matrix, vector, rcond=None)
    return coefficients


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The weights of the power-function EMA (sigma_rel, step) as the snapshots' best combination."""
    coefficients = reconstruction_coefficients([(s.gamma, s.step) for s in snapshots], sigma_rel, step)
    names = list(snapshots[0].weights)
    result = {}
    for name in names:
        first = snapshots[0].weights[name]
        if not first.is_floating_point():
            result[name] = first.clone()  # integer buffers are not averaged
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for coefficient, snapshot in zip(coefficients, snapshots):
            total += float(coefficient) * snapshot.weights[name].double()
        result[name] = total.to(first.dtype)
    return result
