"""Sample quality in plain PyTorch: seeded sample generation and feature statistics.

Every sample i is defined by its own seed and label, never by the batch it was drawn in, so the
same (seed, label) gives the same image however the work is split across batches or workers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from ucgm_core.fid import FeatureStatistics
from ucgm_core.sampler import SamplerSettings, sample
from ucgm_core.transports import Transport

Tensor = torch.Tensor


def balanced_labels(count: int, num_classes: int, start: int = 0) -> Tensor:
    """Labels of samples start .. start+count-1 cycling through the classes (class-balanced)."""
    return torch.arange(start, start + count) % num_classes


def sample_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by the sample's own seed. A sample's initial noise is
    the first draw of its stream and the fresh noise of stochastic sampling (rho > 0) continues the
    same stream, so a sample is a function of its seed (and label) alone."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def seeded_noise(seeds: Iterable[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """One standard-normal tensor of `shape` per seed, drawn on the CPU so CPU and GPU runs agree."""
    return _initial_noise(sample_generators(seeds), shape, device)


def _initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def generate(
    network: Callable,
    transport: Transport,
    settings: SamplerSettings,
    seeds: list[int],
    labels: Tensor,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    clamp: bool = True,
) -> Tensor:
    """Images in [-1, 1] (clamped) for the given per-sample seeds and labels; with clamp=False
    the sampler's output as it is (latents, which a VAE decodes and whose range is not [-1, 1]).

    Sample b's noise, initial and (rho > 0) per step, comes from its own stream
    (`sample_generators`), drawn on the CPU, so the same (seed, label) gives the same image in
    any batch, on any worker and (up to the network's own round-off) on CPU or GPU.
    """
    generators = sample_generators(seeds)
    noise = _initial_noise(generators, image_shape, device)
    per_row = generators if settings.stochasticity > 0 else None
    images = sample(network, transport, noise, labels.to(device), settings, generator=per_row)
    return images.clamp(-1, 1) if clamp else images


class StageTimer:
    """Wall-clock seconds per named stage, accumulated. On CUDA it synchronises at the end of a
    stage, so asynchronous GPU work is charged to the stage that queued it.

        timer = StageTimer(device)
        with timer("sampling"):
            images = generate(...)
        timer.seconds  # {"sampling": 1.23}
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


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
    timer: StageTimer | None = None,
) -> FeatureStatistics:
    """float64 feature statistics of `num_samples` class-balanced samples with seeds seed..seed+n-1
    (sample i has seed `seed + i` and label `i % num_classes`). A `timer` receives the seconds
    spent in "sampling", "features" and "statistics"."""
    timer = timer or StageTimer(device)
    statistics = None
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        seeds = list(range(seed + start, seed + start + count))
        with timer("sampling"):
            images = generate(network, transport, settings, seeds, balanced_labels(count, num_classes, start), image_shape, device)
        with timer("features"):
            features = extractor(images)
        with timer("statistics"):
            batch = FeatureStatistics.from_features(features)
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
