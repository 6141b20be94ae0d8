"""The single-process `train` verb on real data (sklearn digits): learning, outputs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.train import checkpoints
from orchestrator.config import load_job
from orchestrator.train.run import run_train
from driver_helpers import stopped_by_a_signal
from ucgm_core.model_file import load_model_file
from ucgm_core.sampler import sample

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp: Path, *overrides: str):
    return load_job(
        ROOT / "jobs/digits.yaml",
        [
            "distributed.backend=local",
            f"output_dir={tmp / 'out'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
            "train.log_every=25",
            "train.sample_every=100000",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run shared by the tests below (about a minute on 2 CPU cores)."""
    tmp = tmp_path_factory.mktemp("digits")
    config = _job(tmp, "train.steps=400", "train.checkpoint_every=200", "evaluation.num_samples=500", "sampler.steps=10")
    return config, run_train(config)


def test_short_digits_run_lowers_the_loss(trained):
    _, summary = trained
    assert summary.steps == 400
    assert summary.last_loss < 0.8 * summary.first_loss, summary


def test_trained_samples_beat_the_untrained_model_on_frechet_distance(trained):
    _, summary = trained
    assert summary.extractor.startswith("mnist-cnn-penultimate")
    assert summary.frechet_trained < 0.7 * summary.frechet_untrained, summary


def test_run_folder_holds_checkpoint_grid_metrics_and_model_file(trained):
    config, summary = trained
    run_dir = Path(config.run_dir)
    assert checkpoints.saved_steps(str(run_dir)) == [200, 400]
    assert (run_dir / "samples" / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(25, 401, 25))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 400


def test_model_file_loads_without_the_orchestrator_and_samples(trained):
    config, _ = trained
    contents = load_model_file(str(Path(config.run_dir) / "model.pt"))
    assert (contents.input_size, contents.in_channels, contents.num_classes) == (8, 1, 10)
    from ucgm_core.transports import build_transport

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = sample(contents.model, build_transport(contents.transport), noise, torch.arange(4), contents.sampler)
    assert images.shape == noise.shape and torch.isfinite(images).all()


def test_mlflow_run_holds_params_metrics_and_sample_grid(trained):
    from mlflow.tracking import MlflowClient

    config, summary = trained
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["objective.consistency_ratio"] == "0.0"
    assert run.data.params["train.steps"] == "400"
    assert {"loss", "grad_norm", "images_per_second", "frechet_distance"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/final.png" in artifacts


def test_rerunning_a_job_resumes_from_its_last_checkpoint(tmp_path):
    first = run_train(_job(tmp_path, "train.steps=20", "train.checkpoint_every=10", "evaluation.num_samples=50"))
    second = run_train(_job(tmp_path, "train.steps=30", "train.checkpoint_every=10", "evaluation.num_samples=50"))
    assert (first.steps, second.resumed_from, second.steps) == (20, 20, 30)
    assert second.mlflow_run_id == first.mlflow_run_id
    assert second.frechet_untrained is None  # the untrained baseline belongs to the first run only
    # what checkpoints cost, as the loop waited for them: 2 saves each run, one restore in the second
    assert (first.checkpoints, second.checkpoints) == (2, 1) and first.checkpoint_seconds > 0
    assert second.restore_seconds > 0
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(tracking_uri=_job(tmp_path).tracking.tracking_uri).get_run(second.mlflow_run_id).data.metrics
    assert {"checkpoint_seconds", "restore_seconds"} <= set(metrics)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = run_train(_job(tmp_path / "a", "train.steps=20", "train.checkpoint_every=10", "evaluation.num_samples=50", "tracking.enabled=false"))
    run_train(_job(tmp_path / "b", "train.steps=10", "train.checkpoint_every=10", "evaluation.num_samples=50", "tracking.enabled=false"))
    resumed = run_train(_job(tmp_path / "b", "train.steps=20", "train.checkpoint_every=10", "evaluation.num_samples=50", "tracking.enabled=false"))
    a = torch.load(Path(whole.run_dir) / "checkpoints/checkpoint_00000020/state.pt", weights_only=True)["model"]
    b = torch.load(Path(resumed.run_dir) / "checkpoints/checkpoint_00000020/state.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_of_another_model_size_is_refused_and_left_untouched(tmp_path):
    run_train(_job(tmp_path, "train.steps=5", "train.checkpoint_every=5", "evaluation.num_samples=50", "tracking.enabled=false"))
    state_file = tmp_path / "out/digits/checkpoints/checkpoint_00000005/state.pt"
    before = state_file.read_bytes()
    with pytest.raises(checkpoints.CheckpointError, match="different 'model' section"):
        run_train(_job(tmp_path, "train.steps=10", "model.depth=2", "evaluation.num_samples=50", "tracking.enabled=false"))
    assert state_file.read_bytes() == before


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    state_file = tmp_path / "out/digits/checkpoints/checkpoint_00000005/state.pt"
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
        run_train(_job(tmp_path, "train.steps=10", "tracking.enabled=false"))
    assert state_file.read_bytes() == b"not a checkpoint"


def _model_at(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / f"checkpoints/checkpoint_{step:08d}/state.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        pytest.param("state.pt", "truncate", marks=pytest.mark.slow),
        pytest.param("state.pt", "delete", marks=pytest.mark.slow),
        pytest.param("manifest-rank00000.json", "truncate", marks=pytest.mark.slow),
        pytest.param("manifest-rank00000.json", "delete", marks=pytest.mark.slow),
    ],
)
def test_a_torn_newest_checkpoint_is_skipped_left_in_place_and_the_run_ends_as_if_uninterrupted(tmp_path, name, damage, caplog):
    quick = ("train.checkpoint_every=5", "evaluation.num_samples=50", "tracking.enabled=false")
    whole = run_train(_job(tmp_path / "whole", "train.steps=15", *quick))
    run_train(_job(tmp_path / "torn", "train.steps=10", *quick))
    torn = tmp_path / "torn/out/digits/checkpoints/checkpoint_00000010" / name
    if damage == "truncate":
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    else:
        torn.unlink()
    left = sorted(p.name for p in torn.parent.iterdir())

    resumed = run_train(_job(tmp_path / "torn", "train.steps=15", *quick))
    assert resumed.resumed_from == 5
    assert "skipping checkpoint" in caplog.text and "checkpoint_00000010" in caplog.text
    for key, value in _model_at(whole.run_dir, 15).items():
        torch.testing.assert_close(_model_at(resumed.run_dir, 15)[key], value, rtol=0, atol=0, msg=key)
    # the torn folder was left as it was until the run wrote step 10 again (a committed checkpoint)
    assert left != sorted(p.name for p in torn.parent.iterdir()) or damage == "truncate"
    assert checkpoints.saved_steps(resumed.run_dir) == [10, 15]


def test_a_run_whose_checkpoints_are_all_torn_is_refused_with_each_one_named(tmp_path):
    quick = ("train.checkpoint_every=5", "evaluation.num_samples=50", "tracking.enabled=false")
    run_train(_job(tmp_path, "train.steps=10", *quick))
    root = tmp_path / "out/digits/checkpoints"
    for step in (5, 10):
        (root / f"checkpoint_{step:08d}/state.pt").write_bytes(b"cut off")
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint_00000010: state.pt has 7 bytes.*checkpoint_00000005: state.pt has 7"):
        run_train(_job(tmp_path, "train.steps=15", *quick))
    assert (root / "checkpoint_00000010/state.pt").read_bytes() == b"cut off"


@pytest.mark.parametrize("signal_name", [pytest.param(name, marks=pytest.mark.slow) for name in ("SIGTERM", "SIGINT")])
def test_a_signal_to_the_driver_writes_a_checkpoint_at_that_step_and_the_rerun_ends_as_if_uninterrupted(tmp_path, signal_name):
    import re
    import signal

    quick = ("train.steps=60", "train.checkpoint_every=1000", "evaluation.num_samples=50", "tracking.enabled=false")
    stopped = _job(tmp_path / "stopped", *quick)
    overrides = [f"output_dir={stopped.output_dir}", "distributed.backend=local", "train.sample_every=100000", "train.log_every=25", *quick]
    number = getattr(signal, signal_name)
    code, stderr = stopped_by_a_signal(["train", "jobs/digits.yaml", *overrides], Path(stopped.run_dir) / "metrics.jsonl", 25, number)

    assert code == 128 + number, stderr[-3000:]
    step = int(re.search(rf"stopped: stopped on {signal_name} at step (\d+)", stderr).group(1))
    assert 25 < step < 60 and checkpoints.saved_steps(stopped.run_dir) == [step]
    assert not (Path(stopped.run_dir) / "model.pt").exists()

    resumed = run_train(stopped)
    whole = run_train(_job(tmp_path / "whole", *quick))
    assert resumed.resumed_from == step
    for key, value in _model_at(whole.run_dir, 60).items():
        torch.testing.assert_close(_model_at(resumed.run_dir, 60)[key], value, rtol=0, atol=0, msg=key)
    # the stop closed its logging interval there: each step is in one record, none in two
    logged = [json.loads(line)["step"] for line in (Path(resumed.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted({25, step, 50, 60})
