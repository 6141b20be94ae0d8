"""Ray Train + DeepSpeed training on a real local Ray cluster (2 CPU workers, gloo), with
checkpoints on local disk and on a real S3-compatible server, worker restarts and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import io

import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.errors import CheckpointError, ConfigError, ResourceError
from orchestrator.job_checks import check_job
from orchestrator.train.checkpoints import checkpoint_problem
from orchestrator.train.run import run_train
from driver_helpers import stopped_by_a_signal

ROOT = Path(__file__).resolve().parents[1]


def _job(output_dir: str, tmp: Path, *overrides: str):
    return load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={output_dir}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
            "distributed.num_workers=2",
            "distributed.cpus_per_worker=1",
            "train.log_every=10",
            "train.checkpoint_every=10",
            "train.sample_every=100000",
            "evaluation.num_samples=50",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray cluster for the module, started after the S3 variables are set so the
    workers see the local object store."""
    import ray

    from orchestrator.train.ray_backend import connect_for_training

    connect_for_training(_job("unused", Path("/tmp")))
    yield
    ray.shutdown()


def _losses(run_dir: str) -> list[float]:
    lines = storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def _ema_weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(f"{run_dir}/model.pt")), weights_only=True)["state_dict"]


@pytest.mark.slow  # the default run holds ZeRO-3 to the same reference in the torn-checkpoint test below
def test_two_workers_under_zero_3_reproduce_the_single_process_run(ray_cluster, tmp_path):
    # 2 workers x 1 micro-batch and 1 process x 2 accumulated micro-batches see the same chunks;
    # ZeRO-2 is held to the same reference by the worker-restart test below
    common = ("train.steps=40", "tracking.enabled=false")
    local = run_train(_job(str(tmp_path / "local"), tmp_path, *common, "distributed.backend=local", "train.gradient_accumulation_steps=2"))
    zero3 = run_train(_job(str(tmp_path / "zero3"), tmp_path, *common, "distributed.zero_stage=3"))

    reference = _losses(local.run_dir)
    assert len(reference) == 4 and reference[-1] < reference[0]
    for run in (zero3,):
        assert _losses(run.run_dir) == pytest.approx(reference, rel=1e-5)
        # the EMA (updated from gathered parameters under ZeRO-3) ends where the single process's does
        for name, value in _ema_weights(local.run_dir).items():
            torch.testing.assert_close(_ema_weights(run.run_dir)[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # the default run resumes from S3 in the torn-checkpoint test below
def test_checkpoints_go_to_s3_and_a_resubmitted_job_resumes_from_them(ray_cluster, s3_bucket, tmp_path):
    from mlflow.tracking import MlflowClient

    output = f"{s3_bucket}/runs"
    first = run_train(_job(output, tmp_path, "train.steps=20", "distributed.zero_stage=2"))
    second = run_train(_job(output, tmp_path, "train.steps=30", "distributed.zero_stage=2"))
    assert (first.steps, second.resumed_from, second.steps) == (20, 20, 30)

    folders = [name for name in storage.list_names(f"{output}/digits") if name.startswith("checkpoint_0")]
    assert folders == ["checkpoint_00000020", "checkpoint_00000030"]  # the newest keep_checkpoints=2
    assert storage.exists(f"{output}/digits/checkpoint_00000030/ucgm_state.pt")
    assert len(_losses(second.run_dir)) == 3

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert second.mlflow_run_id == first.mlflow_run_id
    history = client.get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [10, 20, 30]
    assert client.get_run(first.mlflow_run_id).data.params["distributed.num_workers"] == "2"


@pytest.mark.slow
def test_a_worker_that_dies_mid_run_is_restarted_and_the_run_ends_as_if_uninterrupted(ray_cluster, tmp_path, monkeypatch, reference_30_steps):
    # 2 workers under ZeRO-2, held to the single process's run; checkpoints are uploaded in the
    # background, so the restart also shows that Ray's async upload keeps what resuming needs
    marker = tmp_path / "fault-happened"
    monkeypatch.setenv("UCGM_FAULT_AT_STEP", "15")
    monkeypatch.setenv("UCGM_FAULT_MARKER", str(marker))
    common = ("train.steps=30", "tracking.enabled=false", "distributed.zero_stage=2", "train.checkpoint_upload=async")
    faulted = run_train(_job(str(tmp_path / "faulted"), tmp_path, *common, "distributed.max_failures=1"))

    assert marker.exists(), "the fault hook never fired"
    assert faulted.steps == 30
    steps = [json.loads(line)["step"] for line in (Path(faulted.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]  # nothing lost, nothing logged twice
    _assert_same_run(faulted, reference_30_steps)


@pytest.mark.parametrize(
    ("override", "key"),
    [("distributed.zero_stage=4", "distributed.zero_stage"), ("distributed.num_workers=0", "distributed.num_workers")],
)
def test_impossible_distributed_settings_fail_before_anything_starts(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        _job(str(tmp_path), tmp_path, override)


def test_a_batch_that_does_not_split_across_workers_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not split into 4 equal micro-batches"):
        _job(str(tmp_path), tmp_path, "train.batch_size=126", "train.gradient_accumulation_steps=2")


def test_unreachable_storage_fails_with_the_path_named(s3_server, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="output_dir: cannot write to .*a-file"):
        check_job(_job(str(blocker / "runs"), tmp_path, "tracking.enabled=false"), "train")
    with pytest.raises(ConfigError, match="output_dir: cannot write to .*no-such-bucket"):
        check_job(_job("s3://no-such-bucket/runs", tmp_path, "tracking.enabled=false", "train.steps=1"), "train")


def test_more_gpus_than_the_cluster_has_fail_instead_of_waiting(ray_cluster, tmp_path):
    with pytest.raises(ResourceError, match="GPUs"):
        run_train(_job(str(tmp_path), tmp_path, "distributed.gpus_per_worker=1", "tracking.enabled=false"))


@pytest.mark.slow  # the default run refuses torn and foreign checkpoints in test_train_local and below
def test_incompatible_or_corrupt_checkpoints_are_refused_and_left_untouched(ray_cluster, tmp_path):
    output = str(tmp_path / "out")
    run_train(_job(output, tmp_path, "train.steps=10", "tracking.enabled=false"))
    state = Path(output) / "digits" / "checkpoint_00000010" / "ucgm_state.pt"
    before = state.read_bytes()

    with pytest.raises(CheckpointError, match="different 'model' section"):
        run_train(_job(output, tmp_path, "train.steps=20", "model.depth=2", "tracking.enabled=false"))
    assert state.read_bytes() == before

    state.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no checkpoint under .* can be resumed .*ucgm_state.pt has 9 bytes"):
        run_train(_job(output, tmp_path, "train.steps=20", "tracking.enabled=false"))
    assert state.read_bytes() == b"truncated"


@pytest.mark.slow  # the default run resubmits a stopped job in the torn-checkpoint test
def test_a_job_that_stopped_is_resumed_when_submitted_again(ray_cluster, tmp_path, monkeypatch):
    import ray.train

    monkeypatch.setenv("UCGM_FAULT_AT_STEP", "15")
    monkeypatch.setenv("UCGM_FAULT_MARKER", str(tmp_path / "fault-happened"))
    job = _job(str(tmp_path / "out"), tmp_path, "train.steps=20", "distributed.max_failures=0", "tracking.enabled=false")
    with pytest.raises(ray.train.TrainingFailedError):
        run_train(job)
    monkeypatch.delenv("UCGM_FAULT_AT_STEP")
    resubmitted = run_train(job)
    assert (resubmitted.resumed_from, resubmitted.steps) == (10, 20)


def _shard_names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference_30_steps(tmp_path_factory):
    """The single-process run that a 2-worker run (or 1 worker x 2 accumulation steps) equals."""
    tmp = tmp_path_factory.mktemp("reference")
    return run_train(
        _job(str(tmp / "out"), tmp, "train.steps=30", "tracking.enabled=false", "distributed.backend=local", "train.gradient_accumulation_steps=2")
    )


def _assert_same_run(run, reference) -> None:
    assert _losses(run.run_dir) == pytest.approx(_losses(reference.run_dir), rel=1e-5)
    for name, value in _ema_weights(reference.run_dir).items():
        torch.testing.assert_close(_ema_weights(run.run_dir)[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _torn_run(tmp_path: Path, damage, zero_stage: int = 2):
    """A 2-worker run to step 20 whose newest checkpoint (step 20) `damage` then tears; the
    re-run to step 30 must resume from step 10."""
    output = str(tmp_path / "out")
    common = ("tracking.enabled=false", f"distributed.zero_stage={zero_stage}")
    run_train(_job(output, tmp_path, "train.steps=20", *common))
    newest = Path(output) / "digits" / "checkpoint_00000020"
    damage(newest)
    return run_train(_job(output, tmp_path, "train.steps=30", *common)), newest


@pytest.mark.slow
def test_a_torn_newest_checkpoint_on_s3_is_skipped_and_the_run_ends_as_if_uninterrupted(ray_cluster, s3_bucket, tmp_path, reference_30_steps):
    # an upload cut off midway: one rank's DeepSpeed shard holds its first 1000 bytes. Under
    # ZeRO-3, so that this also holds ZeRO-3 (and the EMA updated from gathered parameters) to the
    # single process's run; on S3, so that the resume reads its checkpoint from the object store.
    output = f"{s3_bucket}/runs"
    common = ("tracking.enabled=false", "distributed.zero_stage=3")
    run_train(_job(output, tmp_path, "train.steps=20", *common))
    newest = f"{output}/digits/checkpoint_00000020"
    (shard,) = [name for name in storage.file_sizes(newest) if name.endswith("optim_states.pt") and "zero_pp_rank_1_" in name]
    storage.write_bytes(f"{newest}/{shard}", storage.read_bytes(f"{newest}/{shard}")[:1000])

    resumed = run_train(_job(output, tmp_path, "train.steps=30", *common))
    assert (resumed.resumed_from, resumed.steps) == (10, 30)
    logged = storage.read_bytes(f"{resumed.run_dir}/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [10, 20, 30]
    _assert_same_run(resumed, reference_30_steps)

    # resumed by 1 worker at ZeRO-2 (2 accumulation steps keep the 2 micro-batches): the ZeRO-3
    # checkpoint of 2 workers is converted through DeepSpeed's universal checkpoint by the worker;
    # its checkpoint goes to S3 in the background, and is there, committed, when the run returns
    more = run_train(_job(
        output, tmp_path, "train.steps=40", "tracking.enabled=false", "distributed.zero_stage=2", "distributed.num_workers=1",
        "train.checkpoint_upload=async",
    ))
    assert (more.resumed_from, more.steps) == (30, 40)
    assert checkpoint_problem(f"{output}/digits/checkpoint_00000040", check_content=False) is None  # every file, at its size
    logged = storage.read_bytes(f"{resumed.run_dir}/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [10, 20, 30, 40]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_each_file_of_a_torn_checkpoint_is_caught(ray_cluster, tmp_path_factory, reference_30_steps, damage):
    # the file list of a 2-worker ZeRO-2 checkpoint, read from a run rather than written down
    probe = tmp_path_factory.mktemp("probe")
    run_train(_job(str(probe / "out"), probe, "train.steps=10", "tracking.enabled=false", "distributed.zero_stage=2"))
    names = _shard_names(probe / "out/digits/checkpoint_00000010")
    assert {"ucgm_state.pt", "manifest-rank00000.json", "manifest-rank00001.json"} <= set(names)
    for name in names:
        tmp = tmp_path_factory.mktemp("torn")

        def tear(folder: Path, name=name) -> None:
            target = folder / name
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2]) if damage == "truncate" else target.unlink()

        resumed, _ = _torn_run(tmp, tear)
        assert resumed.resumed_from == 10, name
        _assert_same_run(resumed, reference_30_steps)


@pytest.mark.slow
def test_without_zero_a_run_resumes_at_another_worker_count_with_the_same_micro_batches(ray_cluster, tmp_path, reference_30_steps):
    # 2 workers x 1 micro-batch, then 1 worker: 2 accumulation steps keep the 2 chunks of a step
    output = str(tmp_path / "out")
    run_train(_job(output, tmp_path, "train.steps=20", "tracking.enabled=false", "distributed.zero_stage=0"))
    resumed = run_train(_job(output, tmp_path, "train.steps=30", "tracking.enabled=false", "distributed.zero_stage=0", "distributed.num_workers=1"))
    assert (resumed.resumed_from, resumed.steps) == (20, 30)
    _assert_same_run(resumed, reference_30_steps)


@pytest.mark.slow  # ~2 min; the default run stops a submitted job with `ray job stop` (test_job_submit)
def test_sigterm_to_the_driver_writes_a_checkpoint_at_that_step_and_the_rerun_ends_as_if_uninterrupted(
    ray_cluster, tmp_path, reference_30_steps
):
    # what `ray job stop` and a deleted KubeRay pod send; the driver joins this module's cluster
    import re
    import signal

    import ray

    output = tmp_path / "out"
    overrides = [
        f"output_dir={output}", "distributed.num_workers=2", "distributed.cpus_per_worker=1", "distributed.zero_stage=3",
        "train.steps=30", "train.log_every=10", "train.checkpoint_every=10", "train.sample_every=100000",
        "evaluation.num_samples=50", "tracking.enabled=false", f"distributed.ray_address={ray.get_runtime_context().gcs_address}",
    ]
    code, log = stopped_by_a_signal(["train", "jobs/digits.yaml", *overrides], output / "digits/metrics.jsonl", 10, signal.SIGTERM)
    assert code == 143, log[-3000:]
    step = int(re.search(r"stopped: stopped on SIGTERM at step (\d+)", log).group(1))
    assert 10 < step < 30
    assert storage.exists(str(output / f"digits/checkpoint_{step:08d}/ucgm_state.pt"))

    resumed = run_train(_job(str(output), tmp_path, "train.steps=30", "tracking.enabled=false", "distributed.zero_stage=3"))
    assert (resumed.resumed_from, resumed.steps) == (step, 30)
    logged = [json.loads(line)["step"] for line in (output / "digits/metrics.jsonl").read_text().splitlines()]
    assert logged == sorted({10, step, 20, 30})  # the stop closed its interval: each step in one record
    # the intervals the stop did not split have the single process's losses
    whole = [r for r in map(json.loads, (output / "digits/metrics.jsonl").read_text().splitlines()) if r["step"] in (10, 30)]
    assert [r["loss"] for r in whole] == pytest.approx([_losses(reference_30_steps.run_dir)[i] for i in (0, 2)], rel=1e-5)
    for name, value in _ema_weights(reference_30_steps.run_dir).items():
        torch.testing.assert_close(_ema_weights(resumed.run_dir)[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"),
    [
        # (workers, ZeRO stage): 2 -> 1 and 1 -> 2 workers under ZeRO 1, 2 and 3
        ((2, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 3), (1, 3)), ((1, 3), (2, 3)),
        # ZeRO-2 to stage 0 and back, and between ZeRO-3 and ZeRO-1
        ((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 3), (1, 1)),
    ],
)
def test_a_run_resumes_at_another_worker_count_and_zero_stage_and_ends_as_if_uninterrupted(
    ray_cluster, tmp_path, reference_30_steps, first, then
):
    # the accumulation steps keep 2 micro-batches per step whatever the worker count (2 x 1 -> 1 x 2)
    (workers, stage), (new_workers, new_stage) = first, then
    output = str(tmp_path / "out")
    common = ("tracking.enabled=false", "train.gradient_accumulation_steps=" + str(2 // workers))
    run_train(_job(output, tmp_path, "train.steps=20", *common, f"distributed.num_workers={workers}", f"distributed.zero_stage={stage}"))
    resumed = run_train(_job(output, tmp_path, "train.steps=30", *common, f"distributed.num_workers={new_workers}", f"distributed.zero_stage={new_stage}"))
    assert (resumed.resumed_from, resumed.steps) == (20, 30)
    _assert_same_run(resumed, reference_30_steps)


def test_a_resume_keeps_the_checkpoints_micro_batches_where_the_new_worker_count_divides_them(tmp_path, caplog):
    from orchestrator.train.ray_backend import accumulation_for

    config = _job(str(tmp_path), tmp_path, "train.batch_size=96")
    with caplog.at_level("INFO", logger="orchestrator.train.ray_backend"):
        # (micro-batches per step in the checkpoint, new worker count) -> accumulation steps
        assert accumulation_for(2, 1, config, log=True) == 2  # 2 x 1 -> 1 x 2: continues exactly
        assert accumulation_for(4, 2, config, log=True) == 2
        assert "continues exactly" in caplog.text and "no longer" not in caplog.text
        assert accumulation_for(2, 2, config, log=True) == 1  # the job's own setting
        assert accumulation_for(None, 3, config, log=True) == 1  # a checkpoint from before manifests
        assert accumulation_for(2, 3, config, log=True) == 1  # 2 -> 3 workers: same global batch, 3 chunks
        assert "is no longer bitwise reproducible" in caplog.text


@pytest.mark.slow
def test_a_run_resumed_on_3_workers_from_2_continues_at_the_same_global_batch_with_a_warning(ray_cluster, tmp_path, caplog):
    output = str(tmp_path / "out")
    common = ("tracking.enabled=false", "distributed.zero_stage=2", "train.batch_size=96", "distributed.cpus_per_worker=0.5")
    run_train(_job(output, tmp_path, "train.steps=20", *common))
    with caplog.at_level("INFO", logger="orchestrator.train.ray_backend"):
        resumed = run_train(_job(output, tmp_path, "train.steps=30", *common, "distributed.num_workers=3"))
    assert (resumed.resumed_from, resumed.steps) == (20, 30)
    assert "does not divide into 3 workers" in caplog.text and "is no longer bitwise reproducible" in caplog.text
    assert "converts it through DeepSpeed's universal checkpoint" in caplog.text
    assert all(math.isfinite(loss) for loss in _losses(resumed.run_dir))  # no NaN from a bad load


@pytest.mark.slow
def test_a_fault_soak_of_three_sigkilled_workers_ends_bitwise_as_if_uninterrupted(ray_cluster, tmp_path, monkeypatch, reference_30_steps):
    # a seeded draw of 3 (step, rank) kills in one run: each worker SIGKILLs itself after its
    # step (no exception, no cleanup: what the OOM killer or a lost node does), once
    import random

    draw = random.Random(13)
    steps = sorted(draw.sample(range(11, 30), 3))
    ranks = [draw.randrange(2) for _ in steps]
    marker = tmp_path / "faults"
    monkeypatch.setenv("UCGM_FAULT_AT_STEP", ",".join(map(str, steps)))
    monkeypatch.setenv("UCGM_FAULT_RANKS", ",".join(map(str, ranks)))
    monkeypatch.setenv("UCGM_FAULT_SIGNAL", "KILL")
    monkeypatch.setenv("UCGM_FAULT_MARKER", str(marker))
    common = ("train.steps=30", "tracking.enabled=false", "distributed.zero_stage=2")
    soaked = run_train(_job(str(tmp_path / "soaked"), tmp_path, *common, "distributed.max_failures=3"))

    assert sorted(int(line.split()[0]) for line in marker.read_text().splitlines()) == steps, "not every kill happened"
    assert soaked.steps == 30
    logged = [json.loads(line)["step"] for line in (Path(soaked.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10, 20, 30]  # each interval exactly once
    _assert_same_run(soaked, reference_30_steps)
    monkeypatch.delenv("UCGM_FAULT_AT_STEP")
    uninterrupted = run_train(_job(str(tmp_path / "uninterrupted"), tmp_path, *common))
    assert _losses(soaked.run_dir) == _losses(uninterrupted.run_dir)
    for name, value in _ema_weights(uninterrupted.run_dir).items():
        assert torch.equal(_ema_weights(soaked.run_dir)[name], value), name
