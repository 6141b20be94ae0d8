"""Fréchet distance between Gaussians fitted to feature sets, from mergeable float64 statistics.

Each shard of samples keeps the sufficient statistics of its features f_i in R^D:

    n,   s = sum_i f_i,   Q = sum_i f_i f_i^T          (float64)

They add exactly across shards, so a distributed evaluation merges statistics instead of gathering
features. From the merged statistics

    mu = s / n,    Sigma = (Q - n mu mu^T) / (n - 1)

and the Fréchet distance of N(mu1, S1) and N(mu2, S2) is

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

It needs only (mu, Sigma), a `GaussianStatistics`: what `FeatureStatistics.gaussian()` gives, and
what published reference files hold (arrays `mu`, `sigma`; see `GaussianStatistics`).

This is "FID" only when the features are the 2048-d pool features of the TF-ported Inception-v3;
with any other extractor it is a Fréchet distance in that extractor's feature space, and results
should name the extractor (see `ucgm_core.features.FeatureExtractor.identifier`).

Example::

    stats = FeatureStatistics.empty(extractor.feature_dim)
    for batch in shards:
        stats = stats + FeatureStatistics.from_features(extractor(batch))
    distance = frechet_distance_from_statistics(stats, reference_stats)
    # or against a published reference (mu, sigma), e.g. the ADM evaluator's ImageNet-256 batch
    distance = frechet_distance_from_statistics(stats, GaussianStatistics.load("VIRTUAL_imagenet256_labeled.npz"))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch

Tensor = torch.Tensor
ArrayLike = Tensor | np.ndarray


def _as_float64_array(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


@dataclass
class FeatureStatistics:
    """Sufficient statistics (count, sum f, sum f f^T) of a set of D-dimensional features, float64."""

    count: int
    feature_sum: np.ndarray
    outer_sum: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.feature_sum = np.asarray(self.feature_sum, dtype=np.float64)
        self.outer_sum = np.asarray(self.outer_sum, dtype=np.float64)
        if self.count < 0:
            raise ValueError(f"count must be non-negative, got {self.count}")
        if self.feature_sum.ndim != 1:
            raise ValueError(f"feature_sum must have shape (D,), got {self.feature_sum.shape}")
        dim = self.feature_sum.shape[0]
        if self.outer_sum.shape != (dim, dim):
            raise ValueError(f"outer_sum must have shape ({dim}, {dim}) to match feature_sum, got {self.outer_sum.shape}")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.feature_sum.shape[0])

    @classmethod
    def empty(cls, dim: int) -> FeatureStatistics:
        """Statistics of no features: the identity for `merge`."""
        return cls(0, np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64))

    @classmethod
    def from_features(cls, features: ArrayLike) -> FeatureStatistics:
        """Statistics of a (N, D) batch of features, accumulated in float64.

        A torch tensor is accumulated on its own device (float64 matmul) and only the (D, D)
        result is moved to the host.
        """
        if isinstance(features, torch.Tensor):
            if features.ndim != 2:
                raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
            f64 = features.detach().to(torch.float64)
            return cls(
                f64.shape[0],
                f64.sum(dim=0).cpu().numpy(),
                (f64.T @ f64).cpu().numpy(),
            )
        f64 = np.asarray(features, dtype=np.float64)
        if f64.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {f64.shape}")
        return cls(f64.shape[0], f64.sum(axis=0), f64.T @ f64)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Statistics of the union of both feature sets (exact: counts and sums add)."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"can only merge FeatureStatistics, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(
                f"cannot merge statistics of {self.dim}-d and {other.dim}-d features; "
                "were they computed with different feature extractors?"
            )
        return FeatureStatistics(
            self.count + other.count,
            self.feature_sum + other.feature_sum,
            self.outer_sum + other.outer_sum,
        )

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        return self.merge(other)

    def __radd__(self, other: object) -> FeatureStatistics:
        # Lets the builtin sum(list_of_statistics) start from its integer 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def mean(self) -> np.ndarray:
        """mu = s / n."""
        if self.count < 1:
            raise ValueError("mean of empty statistics (count = 0); accumulate some features first")
        return self.feature_sum / self.count

    def covariance(self) -> np.ndarray:
        """Sigma = (Q - n mu mu^T) / (n - 1), the unbiased sample covariance (symmetrised)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.count}")
        mu = self.mean()
        covariance = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
        return 0.5 * (covariance + covariance.T)

    def gaussian(self) -> GaussianStatistics:
        """(mu, Sigma) of the Gaussian fitted to these features (the unbiased covariance)."""
        return GaussianStatistics(self.mean(), self.covariance())

    def save(self, file: str | os.PathLike | IO[bytes]) -> None:
        """Write as .npz to a path or a writable binary file object (e.g. an fsspec file)."""
        if isinstance(file, (str, os.PathLike)):
            # Open ourselves: np.savez would append ".npz" to a path lacking it.
            with open(file, "wb") as handle:
                self.save(handle)
            return
        np.savez(
            file,
            count=np.asarray(self.count, dtype=np.int64),
            feature_sum=self.feature_sum,
            outer_sum=self.outer_sum,
        )

    @classmethod
    def load(cls, file: str | os.PathLike | IO[bytes]) -> FeatureStatistics:
        """Read statistics written by `save` from a path or a readable binary file object."""
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as handle:
                return cls.load(handle)
        with np.load(file, allow_pickle=False) as data:
            missing = {"count", "feature_sum", "outer_sum"} - set(data.files)
            if missing:
                raise ValueError(f"not a FeatureStatistics file: missing arrays {sorted(missing)}")
            return cls(int(data["count"]), data["feature_sum"], data["outer_sum"])


@dataclass
class GaussianStatistics:
    """Mean mu (D,) and covariance Sigma (D, D) of a set of features, float64: all a Fréchet
    distance needs, but no longer mergeable (the count is gone).

    Published reference statistics come in this form: the ADM (guided-diffusion) evaluator's
    `VIRTUAL_imagenet256_labeled.npz`, pytorch-fid's and clean-fid's `.npz` files hold arrays `mu`
    and `sigma` with sigma = np.cov(features, rowvar=False), the unbiased normalisation by N - 1.
    That is `FeatureStatistics.covariance`'s convention too, so for the same features
    `FeatureStatistics.from_features(f).gaussian()` and such a file agree to round-off.
    """

    mean: np.ndarray
    covariance: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.covariance = np.asarray(self.covariance, dtype=np.float64)
        if self.mean.ndim != 1:
            raise ValueError(f"mean (mu) must have shape (D,), got {self.mean.shape}")
        dim = self.mean.shape[0]
        if self.covariance.shape != (dim, dim):
            raise ValueError(f"covariance (sigma) must have shape ({dim}, {dim}) to match the mean, got {self.covariance.shape}")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.mean.shape[0])

    @classmethod
    def load(cls, file: str | os.PathLike | IO[bytes]) -> GaussianStatistics:
        """Read the arrays `mu` and `sigma` of an .npz (a path or a readable, seekable binary file
        object); its other arrays (the ADM file's `arr_0` of images) are not read."""
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as handle:
                return cls.load(handle)
        with np.load(file, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"not a mu/sigma statistics file: missing arrays {sorted(missing)} (has {sorted(data.files)})")
            return cls(data["mu"], data["sigma"])


def _gaussian(statistics: FeatureStatistics | GaussianStatistics) -> GaussianStatistics:
    if isinstance(statistics, FeatureStatistics):
        return statistics.gaussian()
    if isinstance(statistics, GaussianStatistics):
        return statistics
    raise TypeError(f"expected FeatureStatistics or GaussianStatistics, got {type(statistics).__name__}")


def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix via eigh.

    Eigenvalues within round-off of zero are set to zero (see `_clamp_round_off`).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    roots = np.sqrt(_clamp_round_off(eigenvalues))
    return (eigenvectors * roots) @ eigenvectors.T


def _clamp_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are below its round-off level D * eps * max|lambda|.

    Exact zeros come out of eigh as +-1e-16-sized noise, and a square root would magnify that
    noise to 1e-8 (rank-deficient covariances are common: fewer samples than dimensions, dead
    ReLU features); below the round-off level an eigenvalue carries no information.
    """
    scale = float(np.max(np.abs(eigenvalues), initial=0.0))
    threshold = eigenvalues.shape[0] * np.finfo(np.float64).eps * scale
    return np.where(eigenvalues > threshold, eigenvalues, 0.0)


def frechet_distance(mean1: ArrayLike, cov1: ArrayLike, mean2: ArrayLike, cov2: ArrayLike) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), in float64.

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix
    M = S1^{1/2} S2 S1^{1/2} (M = S1^{-1/2} (S1 S2) S1^{1/2} when S1 is invertible, and by
    continuity otherwise), so Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both square roots
    come from symmetric eigendecompositions, which stay accurate for near-singular covariances
    where a general matrix square root produces complex round-off.
    """
    mu1, mu2 = _as_float64_array(mean1), _as_float64_array(mean2)
    sigma1, sigma2 = _as_float64_array(cov1), _as_float64_array(cov2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    for name, sigma in (("cov1", sigma1), ("cov2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means, got {sigma.shape}")
    sqrt_sigma1 = _symmetric_psd_sqrt(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt_product = float(np.sqrt(_clamp_round_off(eigenvalues)).sum())
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


def frechet_distance_from_statistics(
    first: FeatureStatistics | GaussianStatistics, second: FeatureStatistics | GaussianStatistics
) -> float:
    """Fréchet distance between the Gaussians of two sets of feature statistics, each given as
    sums (`FeatureStatistics`) or as (mu, Sigma) (`GaussianStatistics`, e.g. a published reference)."""
    if first.dim != second.dim:
        raise ValueError(f"statistics have different feature dimensions: {first.dim} and {second.dim}")
    first, second = _gaussian(first), _gaussian(second)
    return frechet_distance(first.mean, first.covariance, second.mean, second.covariance)
