"""Joining a Ray cluster: the one named by `distributed.ray_address`, the one a submitted job
runs on, or a local one started in-process for laptops and tests; and what that cluster can hold.

Inside a job started by `ray job submit` (or a KubeRay RayJob) the job server sets RAY_ADDRESS
to its own cluster, and `ray_address: null` joins it: the same job spec runs on a laptop and as a
submitted job. Outside one, `null` always starts a fresh in-process cluster, even when a
`ray start` cluster runs on the machine (join that one with `ray_address: auto`).
"""

from __future__ import annotations

import logging
import math
import os

from orchestrator.errors import ResourceError

# Set by Ray's job server in the environment of every job driver it starts.
_SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# "off" skips `check_fits`, for clusters that grow beyond what they publish (see there).
_RESOURCE_CHECK_VARIABLE = "UCGM_RESOURCE_CHECK"

logger = logging.getLogger(__name__)


def connect(address: str | None, cpus_needed: float) -> None:
    """Join the cluster at `address` ('auto', 'host:port', 'ray://host:port'), or the one
    RAY_ADDRESS names (a submitted job's), or start a local one with at least `cpus_needed`
    logical CPUs. Reuses a connection already made."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # logical CPUs beyond the physical ones only oversubscribe, they never block a local run
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), logging_level=logging.WARNING)
        logger.info("started a local Ray cluster in this process")
    else:
        context = ray.init(address=address, logging_level=logging.WARNING)
        joined = (getattr(context, "address_info", None) or {}).get("gcs_address", address)  # Ray Client contexts have none
        logger.info("joined the Ray cluster at %s", joined)


def in_submitted_job() -> bool:
    """True in the driver of a job started by `ray job submit` / a RayJob."""
    return _SUBMITTED_JOB_VARIABLE in os.environ


def capacity() -> tuple[dict[str, float], dict[str, float]]:
    """(total, largest node) per resource of the cluster, as large as it can grow: when an
    autoscaler publishes its node groups (Ray's autoscaler v2 does, on KubeRay or the cluster
    launcher) their maximum sizes count, so a job waits for nodes that can come rather than
    being refused."""
    import ray

    total = dict(ray.cluster_resources())
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for resource, amount in node.get("Resources", {}).items():
                largest[resource] = max(largest.get(resource, 0.0), amount)
    for group_total, group_node in _autoscaler_limits():
        for resource, amount in group_total.items():
            total[resource] = max(total.get(resource, 0.0), amount)
        for resource, amount in group_node.items():
            largest[resource] = max(largest.get(resource, 0.0), amount)
    return total, largest


def _autoscaler_limits() -> list[tuple[dict[str, float], dict[str, float]]]:
    """(group maximum, one node) per autoscaler node group; empty without an autoscaler. Read
    the way Ray Train V2 reads it (a private accessor; its absence means no autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # older/newer Ray without the accessor: judge by the live nodes alone
        return []
    if config is None:
        return []
    limits = []
    for group in config.node_group_configs:
        node = {resource: float(amount) for resource, amount in group.resources.items()}
        count = math.inf if group.max_count == -1 else group.max_count
        limits.append(({resource: amount * count for resource, amount in node.items()}, node))
    return limits


def check_fits(count: int, per_unit: dict[str, float], what: str, fix: str) -> None:
    """Raise ResourceError unless `count` units (workers, actors) of `per_unit` resources fit
    the cluster: in total, and each unit on one node. `what` names a unit and how the job asks
    for it ("8 workers (distributed.num_workers=8)"); `fix` says which keys to change.

    A cluster whose autoscaler does not publish its node groups (KubeRay's autoscaler v1) looks
    smaller than it can grow; there UCGM_RESOURCE_CHECK=off (in the nodes' environment) leaves the
    waiting to Ray."""
    if os.environ.get(_RESOURCE_CHECK_VARIABLE, "on").lower() == "off":
        logger.warning("%s=off: not checking that %s fit the cluster; Ray waits until they do", _RESOURCE_CHECK_VARIABLE, what)
        return
    total, largest = capacity()
    for resource, amount in per_unit.items():
        if amount <= 0:
            continue
        needed = count * amount
        if needed > total.get(resource, 0):
            raise ResourceError(
                f"{what} need {needed:g} {resource}s ({count} x {amount:g}) but the Ray cluster has {total.get(resource, 0):g}; "
                f"{fix}, or add nodes"
            )
        if amount > largest.get(resource, 0):
            raise ResourceError(
                f"each of {what} needs {amount:g} {resource}s on one node but the largest node of the Ray cluster has "
                f"{largest.get(resource, 0):g}; {fix}, or add larger nodes"
            )
