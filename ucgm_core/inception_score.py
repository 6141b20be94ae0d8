"""The Inception Score (Salimans et al. 2016) from class logits, as sums that shards add.

With p(y|x) the softmax of a sample's logits and, over a split of N samples, p(y) = mean p(y|x):

    IS = exp( E_x KL(p(y|x) || p(y)) ) = exp( (1/N) sum_x sum_y p log p  -  sum_y p(y) log p(y) ).

Both terms come from two sums over samples, sum_x sum_y p(y|x) log p(y|x) (a scalar) and
sum_x p(y|x) (a vector): like FID's feature sums, shards compute them and a driver adds them. The
samples are cut into `splits` contiguous parts by index (sample i in split i * splits // N, as the
ADM evaluator cuts its array) and the score is the mean and standard deviation over splits.

Example::

    stats = LogitStatistics.from_logits(logits, indices, num_samples=N)   # per shard
    mean, std = (stats_a + stats_b).score()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SPLITS = 10


@dataclass
class LogitStatistics:
    """Per split s: count[s], entropy_sum[s] = sum_x sum_y p log p, probability_sum[s] = sum_x p(y|x), float64."""

    count: np.ndarray  # (S,)
    entropy_sum: np.ndarray  # (S,)
    probability_sum: np.ndarray  # (S, classes)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, indices: np.ndarray, *, num_samples: int, splits: int = DEFAULT_SPLITS) -> LogitStatistics:
        """The sums of samples `indices` (of num_samples in all), whose logits are (B, classes)."""
        if splits < 1 or splits > num_samples:
            raise ValueError(f"splits must lie in [1, num_samples={num_samples}], got {splits}")
        log_p = torch.log_softmax(logits.double(), dim=1)
        p = log_p.exp()
        split = torch.as_tensor(np.asarray(indices, dtype=np.int64) * splits // num_samples)
        count = torch.zeros(splits, dtype=torch.float64).index_add_(0, split, torch.ones(len(split), dtype=torch.float64))
        entropy = torch.zeros(splits, dtype=torch.float64).index_add_(0, split, (p * log_p).sum(dim=1))
        probability = torch.zeros(splits, logits.shape[1], dtype=torch.float64).index_add_(0, split, p)
        return cls(count.numpy(), entropy.numpy(), probability.numpy())

    def __add__(self, other: LogitStatistics) -> LogitStatistics:
        return LogitStatistics(self.count + other.count, self.entropy_sum + other.entropy_sum, self.probability_sum + other.probability_sum)

    def score(self) -> tuple[float, float]:
        """(mean, standard deviation) of the Inception Score over the splits."""
        if (self.count == 0).any():
            raise ValueError(f"a split holds no samples (counts {self.count.tolist()})")
        marginal = self.probability_sum / self.count[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(marginal > 0, marginal * np.log(marginal), 0.0).sum(axis=1)
        scores = np.exp(self.entropy_sum / self.count - cross)
        return float(scores.mean()), float(scores.std())
