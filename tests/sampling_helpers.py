"""Helpers shared by the evaluate / generate tests: a tiny model file and a local Ray cluster."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from ucgm_core.dit import DiTSettings, build_dit
from ucgm_core.model_file import model_file_bytes
from ucgm_core.sampler import SamplerSettings

TINY = DiTSettings(size="tiny", patch_size=2)


def tiny_model(seed: int = 0, *, input_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> torch.nn.Module:
    """A tiny DiT with every weight perturbed, so that (unlike a fresh adaLN-Zero DiT, whose
    output is 0) its samples vary with the noise and the label."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = build_dit(TINY, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def write_tiny_model_file(path: str | Path, seed: int = 0, *, input_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> str:
    """Write a model file (as training would) for `tiny_model(seed)`; returns the path."""
    model = tiny_model(seed, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    data = model_file_bytes(
        model, settings=TINY, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        transport="linear", sampler=SamplerSettings(),
    )
    storage.write_bytes(str(path), data)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A fresh local Ray cluster for one test module, with 2 CPUs: two actors of 1 CPU then fill
    it, as on a node sized for them (a pipeline stage that needs a CPU besides the actors would
    hang there). Started after the S3 server so workers inherit the AWS_* variables. Yields the
    cluster's address."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
