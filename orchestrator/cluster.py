"""Joining a Ray cluster: the one named by `distributed.ray_address`, or a local one started
in-process for laptops and tests."""

from __future__ import annotations

import logging
import math
import os


def connect(address: str | None, cpus_needed: float) -> None:
    """Join the cluster at `address` ('auto', 'ray://host:port'), or start a local one with at
    least `cpus_needed` logical CPUs when `address` is None. Reuses a connection already made."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # logical CPUs beyond the physical ones only oversubscribe, they never block a local run
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
