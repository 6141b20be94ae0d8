"""Scores of checkpoints during training (evaluation.every): a real local Ray cluster, one
training worker and one scoring actor of 1 CPU each, real MLflow; faults: a scoring actor
SIGKILLed mid-batch, a driver SIGKILLed mid-evaluation and the job run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import load_job
from orchestrator.errors import ConfigError
from orchestrator.job_checks import check_job
from orchestrator.sample.evaluate import run_evaluate
from orchestrator.sample.reference import run_reference
from orchestrator.train import checkpoint_scores
from orchestrator.train.run import run_train

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "jobs/digits.yaml"
STEPS = (10, 20, 30)
SETTINGS = "[{steps: 1}, {steps: 2}]"


def _overrides(tmp: Path, name: str) -> list[str]:
    return [
        f"name={name}",
        f"output_dir={tmp / 'outputs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "data.limit=300",
        "distributed.num_workers=1",
        "distributed.cpus_per_worker=1",
        "train.steps=30",
        "train.batch_size=32",
        "train.log_every=10",
        "train.checkpoint_every=10",
        "train.sample_every=100000",
        "evaluation.num_samples=40",
        "evaluation.batch_size=30",
        "evaluation.cpus_per_actor=1",
        "evaluation.every=10",
        "evaluation.every_samples=60",
        f"evaluation.sampler_grid={SETTINGS}",
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """2 CPUs: the training worker's and the scoring actor's. The actor-kill hook's arming file
    is named before the cluster starts, so that every actor's environment holds it."""
    import logging

    import ray

    tmp = tmp_path_factory.mktemp("checkpoint-scores")
    arm = tmp / "kill-an-actor"
    os.environ["UCGM_ACTOR_FAULT_ARM"] = str(arm)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    config = load_job(SPEC, _overrides(tmp, "reference"))
    run_reference(config)  # at <output_dir>/reference/, which every job of the module shares
    try:
        yield tmp, arm
    finally:
        ray.shutdown()
        os.environ.pop("UCGM_ACTOR_FAULT_ARM", None)


def _history(config, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.name)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = '%s'" % config.name)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _distances(run_dir: str) -> dict[int, list[float]]:
    return {step: [r["distance"] for r in checkpoint_scores.read_scores(run_dir, step)["results"]] for step in checkpoint_scores.scored_steps(run_dir)}


def _assert_same_distances(run_dir: str, expected_dir: str) -> None:
    """The same training (same seed) and the same samples: a redone score is the first one."""
    ours, expected = _distances(run_dir), _distances(expected_dir)
    assert sorted(ours) == sorted(expected) == list(STEPS)
    for step in STEPS:
        assert ours[step] == pytest.approx(expected[step], rel=1e-9), step


@pytest.fixture(scope="module")
def scored_run(cluster):
    tmp, _ = cluster
    config = check_job(load_job(SPEC, _overrides(tmp, "scored")), "train")
    summary = run_train(config)
    return config, summary


def test_every_checkpoint_step_is_scored_once_in_mlflow_and_beside_the_checkpoint(scored_run):
    config, summary = scored_run
    assert summary.steps == 30
    distances = _distances(config.run_dir)
    assert sorted(distances) == list(STEPS)
    assert checkpoint_scores.pending_steps(config.run_dir) == []
    for number, setting in enumerate(["steps_1", "steps_2"]):
        history = _history(config, f"checkpoint/frechet_distance/{setting}")
        assert [step for step, _ in history] == list(STEPS)  # one value per checkpoint step
        assert [value for _, value in history] == pytest.approx([distances[step][number] for step in STEPS], rel=1e-12)
    record = checkpoint_scores.read_scores(config.run_dir, 20)
    assert record["num_samples"] == 60 and record["fingerprint"]["num_samples"] == 60
    assert checkpoint_scores.latest_score(config.run_dir) == {"checkpoint_score": distances[30][0], "checkpoint_score_step": 30}


def test_a_checkpoint_score_is_what_evaluate_gives_for_that_step(scored_run, cluster):
    """The scores are evaluate's: the same pipeline on the model file written beside the checkpoint."""
    config, _ = scored_run
    tmp, _ = cluster
    folder = checkpoint_scores.step_folder(config.run_dir, 20)
    overrides = [*_overrides(tmp, "scored"), f"evaluation.model_file={folder}/model.pt", "evaluation.num_samples=60", "tracking.enabled=false"]
    summary = run_evaluate(load_job(SPEC, overrides))
    assert [r.distance for r in summary.results] == pytest.approx(_distances(config.run_dir)[20], rel=1e-9)
    assert _distances(config.run_dir)[10] != _distances(config.run_dir)[30]  # the model changed in between


@pytest.mark.slow
def test_a_scoring_actor_killed_mid_evaluation_is_redone_and_training_finishes(scored_run, cluster):
    config, _ = scored_run
    tmp, arm = cluster
    arm.touch()  # the first SampleStatistics batch (step 10's scoring) SIGKILLs its actor
    faulted = check_job(load_job(SPEC, _overrides(tmp, "actor-killed")), "train")
    summary = run_train(faulted)
    assert not arm.exists(), "no actor took the fault"
    assert summary.steps == 30
    _assert_same_distances(faulted.run_dir, config.run_dir)
    assert [step for step, _ in _history(faulted, "checkpoint/frechet_distance/steps_2")] == list(STEPS)


@pytest.mark.slow
def test_a_driver_killed_mid_evaluation_leaves_it_to_the_next_run_which_scores_each_step_once(scored_run, cluster):
    config, _ = scored_run
    tmp, _ = cluster
    overrides = _overrides(tmp, "driver-killed")
    marker = tmp / "driver-killed-marker"
    environment = {**os.environ, "UCGM_SCORE_FAULT": "10:hang", "UCGM_SCORE_FAULT_MARKER": str(marker)}
    environment.pop("UCGM_ACTOR_FAULT_ARM")
    log = tmp / "driver-killed.log"
    with open(log, "w") as output:
        # its own session: the kill takes the driver and the Ray cluster it started in-process
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "train", str(SPEC), *overrides],
            cwd=ROOT, env=environment, stdout=output, stderr=output, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), f"the evaluation of step 10 never started:\n{log.read_text()[-3000:]}"
            time.sleep(3)  # training goes on meanwhile
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    again = check_job(load_job(SPEC, overrides), "train")
    assert 10 not in checkpoint_scores.scored_steps(again.run_dir)
    summary = run_train(again)
    assert summary.steps == 30
    _assert_same_distances(again.run_dir, config.run_dir)
    for setting in ("steps_1", "steps_2"):
        assert [step for step, _ in _history(again, f"checkpoint/frechet_distance/{setting}")] == list(STEPS)


def test_scores_during_training_are_checked_before_any_work(cluster, tmp_path):
    tmp, _ = cluster
    with pytest.raises(ConfigError) as error:
        check_job(load_job(SPEC, [*_overrides(tmp, "checked"), "evaluation.every=15", "distributed.backend=local"]), "train")
    problems = "\n".join(error.value.problems)
    assert "no multiple of train.checkpoint_every=10" in problems
    assert "distributed.backend=ray" in problems
    with pytest.raises(ConfigError) as error:
        check_job(load_job(SPEC, [*_overrides(tmp, "checked"), f"evaluation.reference_statistics={tmp_path / 'none.npz'}"]), "train")
    assert "python -m orchestrator reference" in "\n".join(error.value.problems)
