"""A job that starts a local in-process Ray cluster (distributed.ray_address null, no RAY_ADDRESS)
is refused, before anything starts, when this machine cannot hold it (orchestrator.cluster.
check_local_capacity); one that fits, fractional CPUs included, passes; joining a cluster is left
to check_fits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import cluster
from orchestrator.actor_pools import ACTOR_GIB, connect_for_pool
from orchestrator.config import load_job
from orchestrator.errors import ResourceError
from orchestrator.train.ray_backend import connect_for_training

ROOT = Path(__file__).resolve().parents[1]
RESOURCE_ERROR_EXIT = 1  # orchestrator.cli: 1 for problems of the inputs or environment (the cluster's size), 2 for a ConfigError


@pytest.fixture(autouse=True)
def _starts_a_local_cluster(monkeypatch):
    """As on a laptop: no cluster to join, the check on."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("UCGM_RESOURCE_CHECK", raising=False)


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def test_a_training_job_too_large_for_the_machine_is_refused_with_nothing_started(tmp_path):
    out = tmp_path / "out"
    ray_tmp = tmp_path / "ray-tmp"  # Ray puts every session it starts under $RAY_TMPDIR/ray/
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UCGM_RESOURCE_CHECK")}
    environment["RAY_TMPDIR"] = str(ray_tmp)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "jobs/digits.yaml", "distributed.num_workers=64", f"output_dir={out}", "tracking.enabled=false"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started

    assert result.returncode == RESOURCE_ERROR_EXIT, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 64 training workers (distributed.num_workers) need 128 CPUs (64 x 2)"), message
    assert f"has {cluster.machine_cores()} logical cores" in message
    assert "lower distributed.num_workers or distributed.cpus_per_worker" in message
    assert "Traceback" not in result.stderr
    # nothing started: no Ray session, no run folder
    assert not list(ray_tmp.rglob("session_*")), sorted(ray_tmp.rglob("*"))
    assert not (out / "digits").exists()
    # the seconds it takes are a benchmark's business (mostly importing torch); no cluster start
    # and no worker start is what the checks above show
    print(f"refused after {elapsed:.1f} s")


def test_a_job_that_fits_is_not_refused():
    cluster.check_local_capacity(None, 1, 1, cluster.TRAIN_WORKER_GIB, "1 training workers (distributed.num_workers)", "lower distributed.num_workers")


def test_fractional_cpus_pack_more_workers_than_cores():
    cores = cluster.machine_cores()
    job = load_job(ROOT / "jobs/digits.yaml", ["distributed.cpus_per_worker=0.5"])
    assert job.distributed.cpus_per_worker == 0.5  # the schema takes fractions
    # 3 x 0.5 on 2 cores (2 * cores - 1 workers of half a CPU: more workers than cores, within them);
    # a negligible memory estimate, so that only the CPU arithmetic is judged on any machine
    cluster.check_local_capacity(None, 2 * cores - 1, 0.5, 0.001, "workers", "lower distributed.num_workers")
    cluster.check_local_capacity(None, 2 * cores, 0.5, 0.001, "workers", "lower distributed.num_workers")
    with pytest.raises(ResourceError, match=rf"need {cores + 0.5:g} CPUs \({2 * cores + 1} x 0.5\).* has {cores} logical cores"):
        cluster.check_local_capacity(None, 2 * cores + 1, 0.5, 0.001, "workers", "lower distributed.num_workers")


def test_more_memory_than_the_machine_has_available_is_refused():
    available = cluster.available_memory_gib()
    assert available is not None and available > 0  # Linux: /proc/meminfo
    per_unit = available  # two of them cannot fit, whatever the machine
    with pytest.raises(ResourceError, match=r"need about .* GiB of memory \(2 x ~.* GiB per process\).* GiB available.*; lower distributed.num_workers"):
        cluster.check_local_capacity(None, 2, 0.001, per_unit, "2 training workers (distributed.num_workers)", "lower distributed.num_workers")


def test_joining_a_cluster_or_the_escape_hatch_skips_the_check(monkeypatch):
    too_many = (10_000, 1, 1.0, "10000 workers", "lower distributed.num_workers")
    cluster.check_local_capacity("auto", *too_many)  # a cluster named by distributed.ray_address
    cluster.check_local_capacity("ray://head:10001", *too_many)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a submitted job's cluster
    cluster.check_local_capacity(None, *too_many)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("UCGM_RESOURCE_CHECK", "off")
    cluster.check_local_capacity(None, *too_many)
    monkeypatch.delenv("UCGM_RESOURCE_CHECK")
    with pytest.raises(ResourceError):
        cluster.check_local_capacity(None, *too_many)


def test_training_and_actor_pools_are_refused_before_connecting():
    digits = ROOT / "jobs/digits.yaml"
    with pytest.raises(ResourceError, match=r"64 training workers \(distributed.num_workers\) need 64 CPUs.*lower distributed.num_workers or distributed.cpus_per_worker"):
        connect_for_training(load_job(digits, ["distributed.num_workers=64", "distributed.cpus_per_worker=1"]))
    with pytest.raises(ResourceError, match=r"64 actors \(evaluation.num_actors\) need 64 CPUs.*lower evaluation.num_actors or evaluation.cpus_per_actor"):
        connect_for_pool(load_job(digits, ["evaluation.num_actors=64"]))
    job = load_job(digits, ["encode.num_actors=64"])
    with pytest.raises(ResourceError, match=r"64 actors \(encode.num_actors\) need 64 CPUs.*lower encode.num_actors or encode.cpus_per_actor"):
        connect_for_pool(job, job.encode.num_actors * job.encode.cpus_per_actor, section="encode")  # as the encode verb calls it
    assert not _ray_connected()
    assert ACTOR_GIB > 0
