"""Improved precision and recall of generated samples (Kynkäänniemi et al. 2019, "Improved
Precision and Recall Metric for Assessing Generative Models"), from feature vectors.

Each set of features spans a manifold estimate: the union of balls around its points, the ball of
point f of radius the distance from f to its k-th nearest neighbour in the same set. Then

    precision = share of generated features inside the real manifold   (fidelity)
    recall    = share of real features inside the generated manifold    (diversity)

A model that drops modes keeps its precision and loses recall; one that blurs modes does the
opposite, which a single FID cannot tell apart.

They need feature sets, not sums: memory and time grow as N^2 in the subset size N (the paper
and the ADM evaluator use 10k of each; 10k x 10k float32 distances are computed in blocks of
BLOCK rows, so at most BLOCK x N distances exist at once).

Example::

    precision, recall = precision_recall(real_features, generated_features, k=3)
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

DEFAULT_K = 3  # the paper's choice
BLOCK = 1024


def _distances(rows: Tensor, columns: Tensor) -> Tensor:
    # float64 for the comparisons near a ball's edge; in blocks of rows, so memory stays BLOCK x N
    return torch.cdist(rows.double(), columns.double())


def knn_radii(features: Tensor, k: int = DEFAULT_K) -> Tensor:
    """Distance from each feature vector to its k-th nearest neighbour among the others (N,)."""
    if not 0 < k < len(features):
        raise ValueError(f"k={k} nearest neighbours need more than k feature vectors, got {len(features)}")
    radii = []
    for start in range(0, len(features), BLOCK):
        distances = _distances(features[start : start + BLOCK], features)
        # the k+1 smallest include the point itself at distance 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def coverage(points: Tensor, manifold: Tensor, radii: Tensor) -> float:
    """The share of `points` inside at least one ball of the manifold (centres `manifold`, radii `radii`)."""
    inside = 0
    for start in range(0, len(points), BLOCK):
        distances = _distances(points[start : start + BLOCK], manifold)
        inside += int((distances <= radii[None, :].double()).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real: Tensor, generated: Tensor, k: int = DEFAULT_K) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real` feature vectors, each (N, D)."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need two (N, D) feature sets of one dimension, got {tuple(real.shape)} and {tuple(generated.shape)}")
    precision = coverage(generated, real, knn_radii(real, k))
    recall = coverage(real, generated, knn_radii(generated, k))
    return precision, recall
