"""A real two-node Ray cluster on this machine (a head and a second node, each with its own CPU and
its own raylet, started with ray.cluster_utils.Cluster): training places one worker on each
node, streams parquet shards from the local S3 server and checkpoints to it, so nothing relies
on a disk the nodes share; it resumes there, and `reference` and `evaluate` run one actor per node."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import write_digit_shards
from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.train.run import run_train

ROOT = Path(__file__).resolve().parents[1]


def _nodes_of(class_fragment: str, since: set[str]) -> set[str]:
    """The nodes that actors whose class name holds `class_fragment` ran on (those not in `since`)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "!=", "PENDING_CREATION")], limit=10000, raise_on_missing_output=False)
    return {a.node_id for a in actors if class_fragment in a.class_name and a.actor_id not in since}


def _actor_ids() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10000, raise_on_missing_output=False)}


@pytest.mark.slow
def test_two_nodes_train_from_s3_shards_checkpoint_and_resume_there_and_evaluate_one_actor_per_node(tmp_path, s3_bucket):
    import ray
    from ray.cluster_utils import Cluster

    shards = tmp_path / "shards"
    write_digit_shards(shards, 400, 4)
    data = f"{s3_bucket}/digits-shards"
    for file in sorted(shards.iterdir()):
        storage.write_bytes(f"{data}/{file.name}", file.read_bytes())

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)  # one CPU each: two 1-CPU workers or actors must take one node each
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2

        def job(*overrides: str):
            return load_job(
                ROOT / "jobs/digits.yaml",
                [
                    f"distributed.ray_address={cluster.address}", "distributed.num_workers=2", "distributed.cpus_per_worker=1",
                    "distributed.zero_stage=2", "data.name=parquet", f"data.path={data}", "data.streaming=true",
                    "data.shuffle_window=2", "data.horizontal_flip=true", f"output_dir={s3_bucket}/runs", "tracking.enabled=false",
                    "train.batch_size=32", "train.log_every=5", "train.checkpoint_every=10", "train.sample_every=1000",
                    "evaluation.num_samples=40", "evaluation.batch_size=20", "evaluation.num_actors=2", "evaluation.cpus_per_actor=1",
                    "sampler.steps=4", *overrides,
                ],
            )

        before = _actor_ids()
        first = run_train(job("train.steps=10"))
        assert _nodes_of("TrainWorker", before) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert any(name.startswith("checkpoint_") for name in storage.list_names(first.run_dir))  # in S3

        resumed = run_train(job("train.steps=20"))
        assert (resumed.resumed_from, resumed.steps) == (10, 20)
        assert storage.exists(f"{resumed.run_dir}/model.pt")

        from orchestrator.sample.evaluate import run_evaluate
        from orchestrator.sample.reference import run_reference

        before = _actor_ids()
        reference = run_reference(job())
        assert reference.count == 400 and reference.path.startswith("s3://")
        assert len(_nodes_of("BlockStatistics", before)) == 2
        before = _actor_ids()
        scored = run_evaluate(job())
        assert len(_nodes_of("MapWorker", before)) == 2
        assert scored.num_samples == 40 and all(row.distance > 0 for row in scored.results)
    finally:
        ray.shutdown()
        cluster.shutdown()
