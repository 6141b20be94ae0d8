"""Transports: the one place that knows how noise and data are mixed and what the network predicts.

Time convention of the whole library: **t = 0 is data, t = 1 is noise**. A transport defines

    x_t = alpha(t) * z + gamma(t) * x              (the input path)
    F*  = alpha_hat(t) * z + gamma_hat(t) * x      (what the network F(x_t, t) is trained to output)

With den = alpha * gamma_hat - gamma * alpha_hat, a network output F is turned back into the
two predictions

    x_hat = (F * alpha - x_t * alpha_hat) / den
    z_hat = (x_t * gamma_hat - F * gamma) / den

Frameworks that put data at t = 1 (shortcut models, LightningDiT) are normalised here: their
transport is written in our time, and `network_time` maps our t to the time their network was
trained to read. Nothing outside this module ever sees the other convention.

Against the UCGM reference code (LINs-lab/UCGM, `methods/transports`), two differences:

- TrigFlow (and vp_cosine) use pi/2 in sin(pi t / 2), cos(pi t / 2) and their derivatives, where
  the reference's TrigFlow writes 1.57: its angle 1.57 t is 5.1e-4 (relative) smaller than ours.
  UCGM-T's weightings use pi/2 as well (ucgm_core.systems.ucgm).
- ReLinear is written in our time (t = 0 data), so it runs the other way from the reference's own
  ReLinear time (t = 0 noise there): t_ours = 1 - t_reference. Anything time-dependent copied from
  a reference config for ReLinear (the training time distribution, `enhanced_range`, the cosine
  time weighting) must be mirrored, t -> 1 - t (the translation table in ucgm_core.systems.ucgm).

Example::

    transport = build_transport("linear")
    x_t = transport.interpolate(x, z, t)
    ideal = transport.ideal_output(x, z, t)     # F*: the velocity z - x for Linear
    x_hat, z_hat = transport.predictions(ideal, x_t, t)    # recovers (x, z) exactly
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Shape a per-sample time (B,) or a scalar so it broadcasts against a (B, ...) tensor."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"time must be a scalar or have shape ({like.shape[0]},) to match the batch; got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class TransportCoefficients:
    """The four path coefficients at a time t and their time derivatives."""

    alpha: Tensor
    gamma: Tensor
    alpha_hat: Tensor
    gamma_hat: Tensor
    d_alpha: Tensor
    d_gamma: Tensor
    d_alpha_hat: Tensor
    d_gamma_hat: Tensor

    @property
    def denominator(self) -> Tensor:
        """den = alpha * gamma_hat - gamma * alpha_hat; zero only where the path is degenerate."""
        return self.alpha * self.gamma_hat - self.gamma * self.alpha_hat


class Transport:
    """Base class. A subclass implements `coefficients(t)`; everything else follows from it."""

    name: str = "transport"

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        raise NotImplementedError

    def network_time(self, t: Tensor) -> Tensor:
        """The time value the network is conditioned on (identity unless a framework's
        network was trained with data at t = 1)."""
        return t

    def interpolate(self, x: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
        """x_t = alpha(t) z + gamma(t) x."""
        c = self.coefficients(broadcast_time(t, x))
        return c.alpha * z + c.gamma * x

    def ideal_output(self, x: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
        """F* = alpha_hat(t) z + gamma_hat(t) x: what the ideal network outputs at x_t on the pair
        (x, z) (the velocity z - x for Linear); UCGM-T's multi-step (lambda = 0) regression target."""
        c = self.coefficients(broadcast_time(t, x))
        return c.alpha_hat * z + c.gamma_hat * x

    def target(self, x: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
        """Deprecated name of `ideal_output` ("target" is the objective's regression target)."""
        warnings.warn(
            "Transport.target is deprecated; use Transport.ideal_output (same formula)", DeprecationWarning, stacklevel=2
        )
        return self.ideal_output(x, z, t)

    def predictions(self, output: Tensor, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(x_hat, z_hat) from a network output F at x_t:
        x_hat = (F alpha - x_t alpha_hat) / den,  z_hat = (x_t gamma_hat - F gamma) / den."""
        if output.shape != x_t.shape:
            raise ValueError(f"network output shape {tuple(output.shape)} != input shape {tuple(x_t.shape)}")
        c = self.coefficients(broadcast_time(t, x_t))
        den = c.denominator
        x_hat = (output * c.alpha - x_t * c.alpha_hat) / den
        z_hat = (x_t * c.gamma_hat - output * c.gamma) / den
        return x_hat, z_hat

    def output_from_predictions(self, x_hat: Tensor, z_hat: Tensor, t: Tensor | float) -> Tensor:
        """The network output that corresponds to a pair (x_hat, z_hat): alpha_hat z_hat + gamma_hat x_hat."""
        return self.ideal_output(x_hat, z_hat, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _constant(t: Tensor, value: float) -> Tensor:
    return torch.full_like(t, value)


class LinearTransport(Transport):
    """Rectified flow / OT flow matching: x_t = t z + (1 - t) x, F = z - x (the velocity)."""

    name = "linear"

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        one, zero = _constant(t, 1.0), _constant(t, 0.0)
        return TransportCoefficients(t, 1 - t, one, -one, one, -one, zero, zero)


class ReLinearTransport(Transport):
    """Flow matching for networks trained with data at s = 1 and predicting x - z
    (shortcut models, LightningDiT, DDT). In our time the path is the Linear one; the network
    reads s = 1 - t and outputs the negated velocity."""

    name = "relinear"

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        one, zero = _constant(t, 1.0), _constant(t, 0.0)
        return TransportCoefficients(t, 1 - t, -one, one, one, -one, zero, zero)

    def network_time(self, t: Tensor) -> Tensor:
        return 1 - t


class TrigFlowTransport(Transport):
    """sCM's TrigFlow: x_t = sin(pi t/2) z + cos(pi t/2) x, F = cos(pi t/2) z - sin(pi t/2) x,
    the derivative of x_t in the angle pi t / 2. (sCM also scales the data to unit variance by
    sigma_d; that is a data-normalisation choice, made by the dataset, not the transport.)"""

    name = "trigflow"

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        w = math.pi / 2
        s, c = torch.sin(w * t), torch.cos(w * t)
        return TransportCoefficients(s, c, c, -s, w * c, -w * s, -w * s, -w * c)


class EDMTransport(Transport):
    """EDM preconditioning with sigma_d = 0.5 and sigma(t) = exp(4 (2.68 t - 1.59)), so sigma runs
    from 0.0017 at t = 0 to 78 at t = 1. With r = sqrt(sigma^2 + sigma_d^2):

        x_t = (x + sigma z) / r,   F* = sigma x / (sigma_d r) - sigma_d z / r,

    which is EDM's F-target (x - c_skip x_noisy) / c_out written in our coefficients."""

    name = "edm"
    sigma_data = 0.5
    log_sigma_scale = 4.0 * 2.68
    log_sigma_shift = -4.0 * 1.59

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        sd = self.sigma_data
        sigma = torch.exp(self.log_sigma_scale * t + self.log_sigma_shift)
        d_sigma = self.log_sigma_scale * sigma
        r = torch.sqrt(sigma**2 + sd**2)
        d_r = sigma * d_sigma / r
        alpha, gamma = sigma / r, 1 / r
        alpha_hat, gamma_hat = -sd / r, sigma / (sd * r)
        # quotient rule, written per coefficient
        d_alpha = (d_sigma * r - sigma * d_r) / r**2
        d_gamma = -d_r / r**2
        d_alpha_hat = sd * d_r / r**2
        d_gamma_hat = (d_sigma * r - sigma * d_r) / (sd * r**2)
        return TransportCoefficients(alpha, gamma, alpha_hat, gamma_hat, d_alpha, d_gamma, d_alpha_hat, d_gamma_hat)


class VPCosineTransport(Transport):
    """Variance-preserving cosine path with x-prediction (Multistep Consistency Models):
    x_t = sin(pi t/2) z + cos(pi t/2) x, F* = x. den = sin(pi t/2) vanishes at t = 0, where
    the noise prediction is undefined; samplers never evaluate there."""

    name = "vp_cosine"

    def coefficients(self, t: Tensor) -> TransportCoefficients:
        w = math.pi / 2
        s, c = torch.sin(w * t), torch.cos(w * t)
        one, zero = _constant(t, 1.0), _constant(t, 0.0)
        return TransportCoefficients(s, c, zero, one, w * c, -w * s, zero, zero)


TRANSPORTS: dict[str, Callable[[], Transport]] = {
    cls.name: cls
    for cls in (LinearTransport, ReLinearTransport, TrigFlowTransport, EDMTransport, VPCosineTransport)
}


def build_transport(name: str) -> Transport:
    """Look a transport up by its config name (`linear`, `relinear`, `trigflow`, `edm`, `vp_cosine`)."""
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}") from None
