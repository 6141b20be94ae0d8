"""Transports against the table of ALGORITHMS.md §1 and against Gaussian data, where the optimal
network output E[F* | x_t] is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from ucgm_core.transports import TRANSPORTS, build_transport

NAMES = ["linear", "relinear", "trigflow", "edm", "vp_cosine"]
DATA_MEAN, DATA_STD = 0.7, 0.5


def table_coefficients(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(alpha, gamma, alpha_hat, gamma_hat) written out from the ALGORITHMS.md table, in our time."""
    half_pi = math.pi / 2
    if name == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    if name == "relinear":  # data at s = 1 - t in the network's time, so the same path, negated output
        return t, 1 - t, -torch.ones_like(t), torch.ones_like(t)
    if name == "trigflow":
        return torch.sin(half_pi * t), torch.cos(half_pi * t), torch.cos(half_pi * t), -torch.sin(half_pi * t)
    if name == "edm":
        sigma = torch.exp(4 * (2.68 * t - 1.59))
        root = torch.sqrt(sigma**2 + 0.25)
        return sigma / root, 1 / root, -0.5 / root, 2 * sigma / root
    if name == "vp_cosine":
        return torch.sin(half_pi * t), torch.cos(half_pi * t), torch.zeros_like(t), torch.ones_like(t)
    raise AssertionError(name)


def gaussian_conditional_expectations(x_t, alpha, gamma, mean=DATA_MEAN, std=DATA_STD):
    """For x ~ N(mean, std^2), z ~ N(0, 1) independent and x_t = alpha z + gamma x (per coordinate):
    Var(x_t) = gamma^2 std^2 + alpha^2, Cov(x, x_t) = gamma std^2, Cov(z, x_t) = alpha, so
    E[x | x_t] = mean + gamma std^2 (x_t - gamma mean) / Var,  E[z | x_t] = alpha (x_t - gamma mean) / Var."""
    var = gamma**2 * std**2 + alpha**2
    centred = x_t - gamma * mean
    return mean + gamma * std**2 * centred / var, alpha * centred / var


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_match_the_algorithms_table(name):
    t = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    c = build_transport(name).coefficients(t)
    for got, want in zip((c.alpha, c.gamma, c.alpha_hat, c.gamma_hat), table_coefficients(name, t)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_ideal_output_conditional_mean_matches_monte_carlo_for_gaussian_data(name):
    """Regress the transport's ideal output F* on its own x_t (jointly Gaussian, so E[F*|x_t] is exactly
    affine) and compare slope and intercept with the closed form alpha_hat E[z|x_t] + gamma_hat E[x|x_t]."""
    transport = build_transport(name)
    generator = torch.Generator().manual_seed(1234)
    batch, dim = 25_000, 4
    for t_value in (0.05, 0.3, 0.5, 0.7, 0.95):
        x = DATA_MEAN + DATA_STD * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
        z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
        t = torch.full((batch,), t_value, dtype=torch.float64)
        x_t = transport.interpolate(x, z, t).flatten()
        ideal = transport.ideal_output(x, z, t).flatten()

        # least squares fit ideal ~ slope * x_t + intercept, with its standard errors
        n = x_t.numel()
        x_mean, y_mean = x_t.mean(), ideal.mean()
        sxx = ((x_t - x_mean) ** 2).sum()
        slope = ((x_t - x_mean) * (ideal - y_mean)).sum() / sxx
        intercept = y_mean - slope * x_mean
        residual_var = ((ideal - intercept - slope * x_t) ** 2).sum() / (n - 2)
        se_slope = torch.sqrt(residual_var / sxx)
        se_intercept = torch.sqrt(residual_var * (1 / n + x_mean**2 / sxx))

        alpha, gamma, alpha_hat, gamma_hat = (
            float(v) for v in table_coefficients(name, torch.tensor(t_value, dtype=torch.float64))
        )

        def closed_form(value: float) -> float:
            e_x, e_z = gaussian_conditional_expectations(torch.tensor(value, dtype=torch.float64), alpha, gamma)
            return float(alpha_hat * e_z + gamma_hat * e_x)

        want_intercept = closed_form(0.0)
        want_slope = closed_form(1.0) - want_intercept
        assert abs(float(slope) - want_slope) < 5 * float(se_slope) + 1e-12, (name, t_value, float(slope), want_slope)
        assert abs(float(intercept) - want_intercept) < 5 * float(se_intercept) + 1e-12, (name, t_value)


@pytest.mark.parametrize("name", NAMES)
def test_predictions_recover_data_and_noise_from_the_ideal_output(name):
    transport = build_transport(name)
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    x = torch.randn(19, 2, 3, 3, generator=generator, dtype=torch.float64)
    z = torch.randn(19, 2, 3, 3, generator=generator, dtype=torch.float64)
    x_hat, z_hat = transport.predictions(transport.ideal_output(x, z, t), transport.interpolate(x, z, t), t)
    torch.testing.assert_close(x_hat, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z_hat, z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_coefficient_derivatives_match_central_finite_differences(name):
    transport = build_transport(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    step = 1e-6
    upper, lower, at = transport.coefficients(t + step), transport.coefficients(t - step), transport.coefficients(t)
    for field in ("alpha", "gamma", "alpha_hat", "gamma_hat"):
        finite_difference = (getattr(upper, field) - getattr(lower, field)) / (2 * step)
        torch.testing.assert_close(getattr(at, f"d_{field}"), finite_difference, rtol=1e-6, atol=1e-7, msg=field)


def test_network_time_reverses_only_for_relinear():
    t = torch.tensor([0.0, 0.25, 1.0])
    for name in NAMES:
        want = 1 - t if name == "relinear" else t
        torch.testing.assert_close(build_transport(name).network_time(t), want)


def test_build_transport_rejects_unknown_names_and_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_transport("nope")
    message = str(error.value)
    assert "nope" in message
    for name in TRANSPORTS:
        assert name in message


def test_target_is_a_deprecated_alias_of_ideal_output():
    transport = build_transport("trigflow")
    x, z, t = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="ideal_output"):
        old = transport.target(x, z, t)
    torch.testing.assert_close(old, transport.ideal_output(x, z, t), rtol=0, atol=0)
