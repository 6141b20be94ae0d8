"""A node drained for preemption (what a spot reclaim does through Ray's autoscaler), on a real
two-node Ray cluster started in this process: the workers write a checkpoint when Ray Train
reports the drain, and when the node then goes, Ray Train restarts them on a new node from that
checkpoint, and the run ends as an uninterrupted one would."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.train.run import run_train

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp: Path, *overrides: str):
    return load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={tmp / 'out'}",
            "tracking.enabled=false",
            "distributed.num_workers=2",
            "distributed.cpus_per_worker=1",
            "distributed.zero_stage=2",
            # Ray counts a restart it sees as a preemption apart (max_preemption_failures), but it
            # may see a surviving rank's "connection reset" first, and count a failure
            "distributed.max_failures=1",
            "train.steps=200",
            "train.log_every=10",
            "train.checkpoint_every=1000",  # only the drain's checkpoint and the last one
            "train.sample_every=100000",
            "evaluation.num_samples=50",
            *overrides,
        ],
    )


def _ema(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(f"{run_dir}/model.pt")), weights_only=True)["state_dict"]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints both ranks have committed (their manifests come last)."""
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_0*") if len(list(p.glob("manifest-rank*.json"))) == 2)


def _train_in_a_thread(job) -> tuple[threading.Thread, dict]:
    """`run_train(job)` started in a thread, so that the test can change the cluster under it; the
    outcome dict gets its "summary" or its "error"."""
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = run_train(job)
        except BaseException as error:  # reported by the test's own thread
            outcome["error"] = error

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_a_drained_node_gets_a_checkpoint_and_its_replacement_resumes_from_it(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # Ray passes it to the controller and workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node holds no worker
    doomed = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        job = _job(tmp_path, f"distributed.ray_address={cluster.address}")
        run_dir = Path(job.run_dir)
        thread, outcome = _train_in_a_thread(job)

        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and metrics.read_text().strip()):
            assert thread.is_alive() and time.monotonic() < deadline, "no interval was logged"
            time.sleep(0.1)
        # `ray drain-node`, the command behind the autoscaler's preemption drains (hidden in `ray --help`)
        drained = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address, "--node-id", doomed.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "600"],
            capture_output=True, text=True, timeout=120,
        )
        assert drained.returncode == 0, drained.stdout + drained.stderr
        while not _checkpoint_steps(run_dir):
            assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint after the drain"
            time.sleep(0.1)
        (saved,) = _checkpoint_steps(run_dir)
        assert 10 <= saved < 200

        # the reclaim: a new node comes, the drained one goes with the workers on it
        cluster.add_node(num_cpus=2)
        cluster.remove_node(doomed, allow_graceful=False)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run did not end after the node was replaced"
        # the same job never interrupted, on the same workers' layout (200 steps of ZeRO-2 drift
        # from a single process's float sums, so the reference is a Ray run)
        whole = run_train(_job(tmp_path / "whole", f"distributed.ray_address={cluster.address}"))
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert "error" not in outcome, repr(outcome.get("error"))
    summary = outcome["summary"]
    assert (summary.steps, summary.resumed_from) == (200, saved)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 201, 10))  # nothing lost, nothing logged twice
    for name, value in _ema(whole.run_dir).items():
        torch.testing.assert_close(_ema(summary.run_dir)[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_an_elastic_run_survives_a_soak_of_kills_one_of_which_shrinks_the_group(tmp_path, monkeypatch):
    # distributed.num_workers: [1, 2] on two 1-CPU nodes, three faults in one run: a worker
    # SIGKILLed at step 15 (Ray Train restarts the group at 2: the node is still there), then one
    # node removed for good after checkpoint 20 (the group restarts with the one worker that fits,
    # from the last checkpoint of 2 workers at ZeRO-2, converted for 1, with 2 accumulation steps
    # that keep the 2 micro-batches per step), then that worker SIGKILLed at step 35 (restarted at 1)
    import ray
    from ray.cluster_utils import Cluster

    marker = tmp_path / "faults"
    monkeypatch.setenv("UCGM_FAULT_AT_STEP", "15,35")
    monkeypatch.setenv("UCGM_FAULT_RANKS", "1,0")
    monkeypatch.setenv("UCGM_FAULT_SIGNAL", "KILL")
    monkeypatch.setenv("UCGM_FAULT_MARKER", str(marker))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    overrides = (
        f"distributed.ray_address={cluster.address}", "distributed.num_workers=[1,2]", "distributed.max_failures=3",
        "train.steps=40", "train.checkpoint_every=10",
    )
    try:
        job = _job(tmp_path, *overrides)
        run_dir = Path(job.run_dir)
        thread, outcome = _train_in_a_thread(job)
        deadline = time.monotonic() + 600
        while not any(step >= 20 for step in _checkpoint_steps(run_dir)):
            assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint of both workers after the first kill"
            time.sleep(0.1)
        cluster.remove_node(doomed, allow_graceful=False)
        thread.join(timeout=900)
        assert not thread.is_alive(), "the run did not end after the node was lost"
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in outcome, repr(outcome.get("error"))
    assert marker.read_text().splitlines() == ["15 rank 1", "35 rank 0"], "not every kill happened"
    summary = outcome["summary"]
    assert summary.steps == 40 and summary.resumed_from == 30  # the last restart: the 1-worker group after step 35
    last = json.loads((run_dir / "checkpoint_00000040" / "manifest-rank00000.json").read_text())
    assert (last["world_size"], last["num_chunks"]) == (1, 2), "the last checkpoint is not the 1-worker group's"
    assert not (run_dir / "checkpoint_00000040" / "manifest-rank00001.json").exists()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]  # each interval exactly once
    # the single process with the same 2 micro-batches per step (2 workers and 1 worker x 2 sum the
    # gradients in another order, so this holds to float32 rounding, not bitwise)
    monkeypatch.delenv("UCGM_FAULT_AT_STEP")
    reference = run_train(_job(tmp_path / "reference", *overrides[1:], "distributed.backend=local", "train.gradient_accumulation_steps=2"))
    for name, value in _ema(reference.run_dir).items():
        torch.testing.assert_close(_ema(summary.run_dir)[name], value, rtol=1e-4, atol=1e-5, msg=name)
