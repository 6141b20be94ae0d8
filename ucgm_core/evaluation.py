"""Sample quality in plain PyTorch: seeded sample generation and feature statistics.

Every sample i is defined by its own seed and label, never by the batch it was drawn in, so the
same (seed, label) gives the same image however the work is split across batches or workers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ucgm_core.fid import FeatureStatistics
from ucgm_core.sampler import SamplerSettings, sample
from ucgm_core.transports import Transport

Tensor = torch.Tensor


def balanced_labels(count: int, num_classes: int, start: int = 0) -> Tensor:
    """Labels of samples start .. start+count-1 cycling through the classes (class-balanced)."""
    return torch.arange(start, start + count) % num_classes


def seeded_noise(seeds: Iterable[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """One standard-normal tensor of `shape` per seed, drawn on the CPU so CPU and GPU runs agree."""
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(draws).to(device)


@torch.no_grad()
def generate(
    network: Callable,
    transport: Transport,
    settings: SamplerSettings,
    seeds: list[int],
    labels: Tensor,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images in [-1, 1] (clamped) for the given per-sample seeds and labels. Stochastic sampling
    (rho > 0) draws its fresh noise from a generator seeded by the first seed of the batch."""
    noise = seeded_noise(seeds, image_shape, device)
    generator = torch.Generator(device=device).manual_seed(int(seeds[0]) + 1) if settings.stochasticity > 0 else None
    images = sample(network, transport, noise, labels.to(device), settings, generator=generator)
    return images.clamp(-1, 1)


@torch.no_grad()
def sample_statistics(
    network: Callable,
    transport: Transport,
    settings: SamplerSettings,
    extractor: Callable[[Tensor], Tensor],
    *,
    num_samples: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureStatistics:
    """float64 feature statistics of `num_samples` class-balanced samples with seeds seed..seed+n-1."""
    statistics = None
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        seeds = list(range(seed + start, seed + start + count))
        images = generate(network, transport, settings, seeds, balanced_labels(count, num_classes, start), image_shape, device)
        batch = FeatureStatistics.from_features(extractor(images))
        statistics = batch if statistics is None else statistics.merge(batch)
    return statistics


@torch.no_grad()
def dataset_statistics(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 500) -> FeatureStatistics:
    """Reference statistics of a set of real images in [-1, 1]."""
    statistics = None
    for start in range(0, len(images), batch_size):
        batch = FeatureStatistics.from_features(extractor(images[start : start + batch_size]))
        statistics = batch if statistics is None else statistics.merge(batch)
    return statistics
