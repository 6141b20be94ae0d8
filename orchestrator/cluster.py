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
import sys

from orchestrator.errors import ResourceError

# Set by Ray's job server in the environment of every job driver it starts.
_SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# "off" skips `check_fits`, for clusters that grow beyond what they publish (see there), and
# `check_local_capacity`.
_RESOURCE_CHECK_VARIABLE = "UCGM_RESOURCE_CHECK"

# Resident memory of one Ray Train worker process, with headroom: Python with torch, Ray Train and
# DeepSpeed imported is ~0.7 GiB; a RayTrainWorker of the digits job (tiny DiT, 2 workers, gloo,
# DeepSpeed engine, EMA and target copies, the data) was measured at ~1.0 GiB RSS while training;
# the rest covers checkpoint writes, sample grids and a somewhat larger model. Ray Train's
# controller (~0.65 GiB) and helper actors (~0.2 GiB each) come once per job on top. Used by
# check_local_capacity; a far larger model needs more, which this does not foresee.
TRAIN_WORKER_GIB = 1.5

logger = logging.getLogger(__name__)


def connect(address: str | None, cpus_needed: float | None = None) -> None:
    """Join the cluster at `address` ('auto', 'host:port', 'ray://host:port'), or the one
    RAY_ADDRESS names (a submitted job's), or start a local one in-process. Reuses a connection
    already made.

    A local cluster has at least `cpus_needed` logical CPUs (more than the machine's cores only
    oversubscribe them, e.g. a sweep's concurrent trials); `check_local_capacity` has refused,
    before this is called, a job of more training workers or actors than the machine can hold."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        cpus = max(machine_cores(), math.ceil(cpus_needed or 0))
        ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING)
        logger.info("started a local Ray cluster in this process (%d CPUs)", cpus)
    else:
        context = ray.init(address=address, logging_level=logging.WARNING)
        joined = (getattr(context, "address_info", None) or {}).get("gcs_address", address)  # Ray Client contexts have none
        logger.info("joined the Ray cluster at %s", joined)


def starts_local_cluster(address: str | None) -> bool:
    """True when `connect(address, ...)` would start a fresh in-process cluster: no address, no
    RAY_ADDRESS, and no Ray connection made already in this process (a local cluster started
    earlier, or the cluster a Ray worker runs on, is reused)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")  # not imported yet: certainly not connected (and no import cost)
    return ray is None or not ray.is_initialized()


def machine_cores() -> int:
    """The logical cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_memory_gib() -> float | None:
    """The memory the machine can give new processes without swapping (MemAvailable), in GiB;
    None when it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except Exception:  # psutil not installed, or no reading on this platform
        return None


def check_local_capacity(address: str | None, units: int, cpus_per_unit: float, gib_per_unit: float, what: str, fix: str) -> None:
    """Raise ResourceError, before anything is started, when the job starts a local in-process
    cluster (`starts_local_cluster(address)`) and this machine cannot hold `units` processes
    (training workers, actors) of `cpus_per_unit` CPUs and about `gib_per_unit` GiB each: more
    CPUs than its logical cores, or more memory than it has available (MemAvailable). `what` names
    the units and how the job asks for them ("64 training workers (distributed.num_workers)");
    `fix` says which keys to lower ("lower distributed.num_workers or distributed.cpus_per_worker").

    Joining a cluster (an address, RAY_ADDRESS, a connection already made) is `check_fits`'s to
    judge from what that cluster publishes; UCGM_RESOURCE_CHECK=off skips this check too.

    `gib_per_unit` is an estimate of one process's resident memory (TRAIN_WORKER_GIB, about
    1.5 GiB for a training worker: python + torch + DeepSpeed imported, a small model and data;
    orchestrator.actor_pools.ACTOR_GIB for an actor), not counting Ray's own processes (GCS,
    raylet, dashboard, Train's controller: about 1 GiB more) nor the driver's. A model far larger
    than the digits one needs more: this refuses what cannot fit, it does not promise that what
    passes will."""
    if os.environ.get(_RESOURCE_CHECK_VARIABLE, "on").lower() == "off":
        logger.warning("%s=off: not checking that %s fit this machine", _RESOURCE_CHECK_VARIABLE, what)
        return
    if not starts_local_cluster(address):
        return
    cores = machine_cores()
    needed_cpus = units * cpus_per_unit
    if needed_cpus > cores + 1e-9:
        raise ResourceError(
            f"{what} need {needed_cpus:g} CPUs ({units} x {cpus_per_unit:g}) but this machine, where the job starts a local "
            f"Ray cluster (distributed.ray_address is null), has {cores} logical cores; {fix}, or join a larger cluster "
            "(distributed.ray_address)"
        )
    available = available_memory_gib()
    needed_gib = units * gib_per_unit
    if available is not None and needed_gib > available:
        raise ResourceError(
            f"{what} need about {needed_gib:g} GiB of memory ({units} x ~{gib_per_unit:g} GiB per process) but this machine, "
            f"where the job starts a local Ray cluster (distributed.ray_address is null), has {available:.1f} GiB available "
            f"({cores} logical cores); {fix}, or join a larger cluster (distributed.ray_address)"
        )


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
