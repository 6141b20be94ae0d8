"""Ray Data actor pools (evaluate, reference, generate, encode): the resources of one actor,
checked against the cluster before any work, and the device inside an actor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator import cluster
from orchestrator.config import JobConfig


# Resident memory of one pool actor (a Ray Data map worker): Python with torch and Ray imported
# (~0.7 GiB), the sampled model or VAE, a feature extractor (Inception for FID), batches of
# images. An estimate with headroom, like cluster.TRAIN_WORKER_GIB's; see cluster.check_local_capacity.
ACTOR_GIB = 1.5

# The sections whose num_actors / cpus_per_actor / gpus_per_actor size an actor pool.
POOL_SECTIONS = ("evaluation", "encode")


def connect_for_pool(config: JobConfig, cpus_needed: float | None = None, section: str = "evaluation") -> None:
    """Join the cluster the job names (distributed.ray_address), or start a local one in-process
    sized to this machine, after refusing (ResourceError, nothing started) a pool this machine
    cannot hold when the cluster is a local one (cluster.check_local_capacity).

    `section` names the config section that sizes the pool (its num_actors and cpus_per_actor):
    `evaluation` (evaluate, generate) or `encode`."""
    if section not in POOL_SECTIONS:
        raise ValueError(f"section {section!r} sizes no actor pool; one of {', '.join(POOL_SECTIONS)}")
    pool = getattr(config, section)
    if cpus_needed is None:
        cpus_needed = pool.num_actors * pool.cpus_per_actor
    cluster.check_local_capacity(
        config.distributed.ray_address,
        pool.num_actors,
        pool.cpus_per_actor,
        ACTOR_GIB,
        f"{pool.num_actors} actors ({section}.num_actors)",
        f"lower {section}.num_actors or {section}.cpus_per_actor",
    )
    cluster.connect(config.distributed.ray_address, cpus_needed)


@dataclass(frozen=True)
class ActorResources:
    count: int
    cpus: float
    gpus: float

    def remote_args(self) -> dict[str, float]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def actor_resources(config: JobConfig) -> ActorResources:
    """The evaluate / generate actor pool (the evaluation section's num_actors, cpus_per_actor,
    gpus_per_actor); refuses what the cluster can never place."""
    evaluation = config.evaluation
    return pool_resources(evaluation.num_actors, evaluation.cpus_per_actor, evaluation.gpus_per_actor, "evaluation")


def pool_resources(count: int, cpus: float, gpus: float | None, section: str) -> ActorResources:
    """`count` actors with `cpus` CPUs and `gpus` GPUs each (None: one GPU per actor when the
    cluster has GPUs), configured in `section`; ResourceError when the cluster cannot hold them."""
    import ray

    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cluster.check_fits(
        count,
        {"CPU": cpus, "GPU": gpus},
        f"{count} actors ({section}.num_actors)",
        f"lower {section}.num_actors, {section}.cpus_per_actor or {section}.gpus_per_actor",
    )
    return ActorResources(count, cpus, gpus)


def actor_device(cpus: float) -> torch.device:
    """The device inside an actor: its GPU when Ray gave it one, else the CPU with as many torch
    threads as the actor has CPUs (so actors on one node do not oversubscribe it)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cpu")


def object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of one array per row, whatever their lengths, for a Ray Data batch an actor returns
    (np.asarray would try to stack equal-length ones into one array)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column
