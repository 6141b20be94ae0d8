"""Fréchet distance and mergeable float64 feature statistics."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch

from ucgm_core.fid import FeatureStatistics, frechet_distance, frechet_distance_from_statistics


def random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.standard_normal((dim, 2 * dim))
    return factor @ factor.T / (2 * dim) + 0.01 * np.eye(dim)


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook computation with a general matrix square root, independent of ours."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    root = np.real(root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


@pytest.mark.parametrize("dim", [16, 32, 64])
def test_frechet_distance_matches_scipy_sqrtm_on_random_spd_covariances(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        sigma1, sigma2 = random_spd(dim, rng), random_spd(dim, rng)
        expected = scipy_frechet_distance(mu1, sigma1, mu2, sigma2)
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_commuting_covariances_has_closed_form():
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_accepts_torch_tensors_and_singular_covariances():
    rng = np.random.default_rng(0)
    factor = rng.standard_normal((8, 3))  # rank 3 in 8 dimensions
    sigma = factor @ factor.T
    distance = frechet_distance(torch.zeros(8), torch.from_numpy(sigma), torch.zeros(8), torch.from_numpy(sigma))
    assert abs(distance) < 1e-9


def test_merged_shard_statistics_equal_whole_set_statistics():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1000, 24)) * 3.0 + 5.0
    whole = FeatureStatistics.from_features(features)
    shards = [FeatureStatistics.from_features(part) for part in np.array_split(features, [100, 137, 600])]
    merged = FeatureStatistics.empty(24)
    for shard in shards:
        merged = merged.merge(shard)
    assert merged.count == whole.count == 1000
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-10)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-12)
    # and both agree with numpy's own estimators
    np.testing.assert_allclose(whole.mean(), features.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(whole.covariance(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    summed = sum(shards)
    assert summed.count == 1000


def test_torch_features_accumulate_in_float64():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 6, generator=generator) + 1000.0  # large offset: float32 sums would lose digits
    stats = FeatureStatistics.from_features(features)
    reference = features.double().numpy()
    assert stats.feature_sum.dtype == np.float64
    np.testing.assert_allclose(stats.covariance(), np.cov(reference, rowvar=False), rtol=1e-8, atol=1e-8)


def test_merging_statistics_of_different_dimensions_is_an_error():
    with pytest.raises(ValueError, match="8-d and 9-d"):
        FeatureStatistics.empty(8) + FeatureStatistics.empty(9)


def test_distance_of_a_set_to_itself_is_zero():
    rng = np.random.default_rng(2)
    stats = FeatureStatistics.from_features(rng.standard_normal((400, 32)))
    assert abs(frechet_distance_from_statistics(stats, stats)) < 1e-9


def test_distance_grows_monotonically_with_mean_shift():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((300, 16))
    reference = FeatureStatistics.from_features(features)
    direction = rng.standard_normal(16)
    distances = [
        frechet_distance_from_statistics(reference, FeatureStatistics.from_features(features + shift * direction))
        for shift in (0.0, 0.1, 0.5, 1.0, 2.0)
    ]
    assert all(later > earlier for earlier, later in zip(distances, distances[1:]))
    # a pure shift leaves the covariance unchanged, so d^2 = shift^2 |direction|^2
    assert distances[-1] == pytest.approx(4.0 * direction @ direction, rel=1e-6)


def test_save_and_load_round_trip_through_a_path_and_a_file_object(tmp_path):
    rng = np.random.default_rng(4)
    stats = FeatureStatistics.from_features(rng.standard_normal((50, 5)))
    path = tmp_path / "reference_stats"  # no suffix: must not grow ".npz"
    stats.save(path)
    assert path.exists()
    buffer = io.BytesIO()
    stats.save(buffer)
    buffer.seek(0)
    for loaded in (FeatureStatistics.load(path), FeatureStatistics.load(buffer)):
        assert loaded.count == 50
        np.testing.assert_array_equal(loaded.feature_sum, stats.feature_sum)
        np.testing.assert_array_equal(loaded.outer_sum, stats.outer_sum)


def test_covariance_needs_two_features():
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics.from_features(np.ones((1, 3))).covariance()


def test_distance_from_merged_shard_statistics_matches_scipy_on_the_raw_features():
    # two correlated feature sets, the first accumulated in uneven shards as the actors do
    rng = np.random.default_rng(5)
    mixing = rng.standard_normal((48, 48)) / 7.0
    first = rng.standard_normal((900, 48)) @ mixing + 0.3
    second = rng.standard_normal((700, 48)) @ (mixing + 0.05 * rng.standard_normal((48, 48)))
    shards = sum(FeatureStatistics.from_features(part) for part in np.array_split(first, [1, 250, 251, 600]))
    ours = frechet_distance_from_statistics(shards, FeatureStatistics.from_features(torch.from_numpy(second)))
    expected = scipy_frechet_distance(first.mean(0), np.cov(first, rowvar=False), second.mean(0), np.cov(second, rowvar=False))
    assert ours == pytest.approx(expected, rel=1e-6)


def test_distance_grows_monotonically_with_a_scale_change():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((400, 12))
    reference = FeatureStatistics.from_features(features)
    distances = [frechet_distance_from_statistics(reference, FeatureStatistics.from_features(features * scale)) for scale in (1.0, 1.1, 1.5, 2.0, 3.0)]
    assert distances[0] == pytest.approx(0.0, abs=1e-9)
    assert all(later > earlier for earlier, later in zip(distances, distances[1:]))
