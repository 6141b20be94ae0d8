"""Time distributions against scipy's distributions (Kolmogorov-Smirnov / DKW bounds), determinism
given a generator, and validation."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from scipy import stats

from ucgm_core.time_distributions import (
    TIME_DISTRIBUTIONS,
    ArctanLogNormalTime,
    BetaTime,
    DiscreteTime,
    LogitNormalTime,
    TimeDistribution,
    UniformTime,
)

SAMPLES = 20_000
# KS p-values below this fail; the draws are seeded, so this is a fixed check, not a flaky one.
P_VALUE_FLOOR = 1e-3


def draw(distribution, seed: int = 0, n: int = SAMPLES, dtype=torch.float64) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    t = distribution.sample(n, generator=generator, dtype=dtype)
    assert t.shape == (n,) and t.dtype == dtype
    assert bool(((t >= 0) & (t <= 1)).all())
    return t.numpy()


def dkw_bound(n: int, failure_probability: float = 1e-6) -> float:
    """Dvoretzky-Kiefer-Wolfowitz: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2)."""
    return math.sqrt(math.log(2 / failure_probability) / (2 * n))


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (2.4, 2.4), (0.8, 1.0)])
def test_beta_time_follows_the_beta_distribution(a, b):
    samples = draw(BetaTime(a=a, b=b))
    assert stats.kstest(samples, stats.beta(a, b).cdf).pvalue > P_VALUE_FLOOR


def test_ks_check_is_sensitive_enough_to_reject_a_nearby_beta():
    samples = draw(BetaTime(a=2.4, b=2.4))
    assert stats.kstest(samples, stats.beta(2.0, 2.0).cdf).pvalue < 1e-6


def test_beta_time_scale_clamps_with_an_atom_at_one():
    scale = 1.5
    samples = draw(BetaTime(a=0.8, b=1.0, scale=scale))
    reference = stats.beta(0.8, 1.0)
    atom = 1 - reference.cdf(1 / scale)
    assert abs(np.mean(samples == 1.0) - atom) < 5 * math.sqrt(atom * (1 - atom) / SAMPLES)
    grid = np.linspace(0.01, 0.99, 99)
    empirical = (samples[None, :] <= grid[:, None]).mean(axis=1)
    assert np.max(np.abs(empirical - reference.cdf(grid / scale))) < dkw_bound(SAMPLES)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.4, 1.0)])
def test_logit_normal_time_follows_the_logit_normal_distribution(mean, std):
    samples = draw(LogitNormalTime(mean=mean, std=std))
    cdf = lambda u: stats.norm.cdf((np.log(u) - np.log1p(-u) - mean) / std)  # noqa: E731
    assert stats.kstest(samples, cdf).pvalue > P_VALUE_FLOOR


@pytest.mark.parametrize("mean, std", [(-1.0, 1.6), (-1.0, 1.4)])
def test_arctan_lognormal_time_follows_the_scm_distribution(mean, std):
    sigma_data = 0.5
    samples = draw(ArctanLogNormalTime(mean=mean, std=std, sigma_data=sigma_data))
    # t = arctan(exp(tau)/sigma_d) / (pi/2)  <=>  tau = log(sigma_d tan(pi t / 2)), increasing in t
    cdf = lambda u: stats.norm.cdf((np.log(sigma_data * np.tan(math.pi / 2 * u)) - mean) / std)  # noqa: E731
    assert stats.kstest(samples, cdf).pvalue > P_VALUE_FLOOR


def test_uniform_time_follows_the_uniform_distribution():
    samples = draw(UniformTime(low=0.2, high=0.7))
    assert samples.min() >= 0.2 and samples.max() <= 0.7
    assert stats.kstest(samples, stats.uniform(loc=0.2, scale=0.5).cdf).pvalue > P_VALUE_FLOOR


def test_discrete_time_is_uniform_on_the_grid_without_zero():
    num_points = 8
    samples = draw(DiscreteTime(num_points=num_points))
    indices = samples * num_points
    np.testing.assert_allclose(indices, np.round(indices), atol=1e-9)
    counts = np.bincount(np.round(indices).astype(int), minlength=num_points + 1)
    assert counts[0] == 0 and len(counts) == num_points + 1
    assert stats.chisquare(counts[1:]).pvalue > P_VALUE_FLOOR


ALL_DISTRIBUTIONS = [
    BetaTime(a=2.4, b=2.4),
    LogitNormalTime(mean=-0.4),
    ArctanLogNormalTime(),
    UniformTime(),
    DiscreteTime(num_points=16),
]


@pytest.mark.parametrize("distribution", ALL_DISTRIBUTIONS, ids=lambda d: d.kind)
def test_same_generator_seed_gives_the_same_draws_and_another_seed_does_not(distribution):
    first, again, other = draw(distribution, seed=7, n=64), draw(distribution, seed=7, n=64), draw(distribution, seed=8, n=64)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("distribution", ALL_DISTRIBUTIONS, ids=lambda d: d.kind)
def test_draws_ignore_and_preserve_the_global_rng(distribution):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = draw(distribution, seed=3, n=32)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    np.testing.assert_array_equal(draw(distribution, seed=3, n=32), first)


@pytest.mark.parametrize("distribution", ALL_DISTRIBUTIONS, ids=lambda d: d.kind)
def test_sample_defaults_to_float32_on_the_generator_device(distribution):
    t = distribution.sample(5, generator=torch.Generator().manual_seed(0))
    assert t.shape == (5,) and t.dtype == torch.float32 and t.device.type == "cpu"


def test_registry_maps_each_kind_to_its_class():
    members = typing.get_args(TimeDistribution)
    assert set(TIME_DISTRIBUTIONS.values()) == set(members)
    for kind, cls in TIME_DISTRIBUTIONS.items():
        assert cls().kind == kind


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (BetaTime, {"a": 0.0}, "a"),
        (BetaTime, {"b": -1.0}, "b"),
        (BetaTime, {"scale": 0.0}, "scale"),
        (BetaTime, {"a": float("nan")}, "a"),
        (BetaTime, {"kind": "uniform"}, "kind"),
        (LogitNormalTime, {"std": 0.0}, "std"),
        (ArctanLogNormalTime, {"std": -1.6}, "std"),
        (ArctanLogNormalTime, {"sigma_data": 0.0}, "sigma_data"),
        (UniformTime, {"low": 0.5, "high": 0.5}, "low"),
        (UniformTime, {"high": 1.5}, "high"),
        (DiscreteTime, {"num_points": 0}, "num_points"),
        (DiscreteTime, {"num_points": 2.5}, "num_points"),
    ],
)
def test_bad_parameters_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)
