"""The `tune` verb: sweep specs checked before any trial, paths resolved where `tune` runs,
seeded suggestions, sampling-only sweeps with the real evaluator, failed trials, a killed sweep
that continues, and (slow) a training sweep of real Ray Train + DeepSpeed trials with ASHA whose
best job reproduces its score."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.errors import ConfigError
from orchestrator.tune.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
TRAINING_SPEC = ROOT / "jobs" / "tune_digits.yaml"
SAMPLING_SPEC = ROOT / "jobs" / "tune_digits_sampling.yaml"
SIGMA_REL_SPEC = ROOT / "jobs" / "tune_digits_sigma_rel.yaml"


def _tracking(tmp: Path) -> str:
    return f"job.tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"


# --------------------------------------------------------------------------- specs, no cluster


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.train.learnin_rate={type: loguniform, low: 1.0e-4, high: 1.0e-3}", "did you mean 'train.learning_rate'"),
        ("space.sampler.stochasticity={type: uniform, low: 0.5, high: 0.5}", "empty range: low=0.5 >= high=0.5"),
        ("space.train.learning_rate={type: loguniform, low: 0, high: 1.0e-3}", "log-uniform needs positive bounds, got low=0"),
        ("space.objective.consistency_ratio={type: uniform, low: 0.0, high: 1.5}", "the value 1.5 is rejected by the job schema"),
        ("space.sampler.extrapolation={type: uniform, low: 0.0, high: 0.5, when: 'sampler.step > 4'}", "did you mean 'sampler.steps'"),
        ("space.sampler.steps={type: uniform, low: 2, high: 8}", "use type: int"),
        ("space.sampler.steps={type: lognormal, low: 2, high: 8}", "did you mean 'loguniform'"),
        ("num_trial=3", "did you mean 'num_trials'"),
        ("job.train.stepz=10", "did you mean 'train.steps'"),
    ],
)
def test_bad_sweep_specs_fail_before_any_trial_starts(override, message, tmp_path):
    with pytest.raises(ConfigError, match="invalid sweep spec") as raised:
        load_sweep(TRAINING_SPEC, [f"output_dir={tmp_path}", override])
    assert message in str(raised.value)
    assert not any(tmp_path.iterdir()), "nothing may be written before the spec is valid"


def test_the_cli_refuses_a_bad_sweep_with_exit_code_2(tmp_path, capsys):
    from orchestrator.cli import main

    code = main(["tune", str(TRAINING_SPEC), f"output_dir={tmp_path}", "space.train.learning_rate={type: loguniform, low: -1, high: 1}"])
    assert code == 2
    assert "space.train.learning_rate: log-uniform needs positive bounds" in capsys.readouterr().err


def test_asha_can_compare_trials_on_their_latest_checkpoint_score(tmp_path):
    with pytest.raises(ConfigError, match="early_stopping.metric: checkpoint_score needs checkpoints scored during training"):
        load_sweep(TRAINING_SPEC, [f"output_dir={tmp_path}", "early_stopping.metric=checkpoint_score"])
    sweep = load_sweep(
        TRAINING_SPEC, [f"output_dir={tmp_path}", "early_stopping.metric=checkpoint_score", "job.evaluation.every=100", "early_stopping.grace_period=null"]
    )
    scheduler = sweep.mode.scheduler(sweep)
    assert (scheduler._metric, scheduler._time_attr) == ("checkpoint_score", "checkpoint_score_step")
    assert min(milestone for milestone, _ in scheduler._brackets[0]._rungs) == 100  # the grace period: evaluation.every
    job = sweep.base_job
    assert sweep.mode.worker_cpus(job) == job.distributed.cpus_per_worker + job.evaluation.num_actors * job.evaluation.cpus_per_actor


def test_a_sampling_sweep_searches_sampler_keys_only(tmp_path):
    with pytest.raises(ConfigError, match=r"mode: sample\) searches sampler\.\* keys and posthoc_ema\.sigma_rel only"):
        load_sweep(SAMPLING_SPEC, [f"output_dir={tmp_path}", "space.train.learning_rate={type: loguniform, low: 1.0e-4, high: 1.0e-3}"])


def test_a_sampling_sweep_reads_its_inputs_where_tune_runs_not_where_a_trial_runs(tmp_path, monkeypatch):
    """Relative paths (`model_file=`, the base job's output_dir and so the default reference
    statistics) mean the directory `tune` starts in; a trial builds its job in Tune's per-trial
    working directory, and finds the same files."""
    from orchestrator.tune.space import RUN_NAME, TRIAL_NUMBER
    from orchestrator.tune.trials import TrialSetup

    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(SAMPLING_SPEC, ["model_file=models/model.pt", "job.output_dir=runs"])
    assert sweep.folder == str(tmp_path / "runs" / "tune_digits_sampling")
    evaluation = sweep.base_raw["evaluation"]
    assert evaluation["model_file"] == str(tmp_path / "models" / "model.pt")
    assert evaluation["reference_statistics"] == str(tmp_path / "runs" / "reference" / "digits-train-mnist-cnn-penultimate.npz")

    trial_dir = tmp_path / "working_dirs" / "trial_0000"
    trial_dir.mkdir(parents=True)
    monkeypatch.chdir(trial_dir)
    setup = TrialSetup(sweep, "sqlite:///unused.db", "sweep", None, {"evaluation.gpus_per_actor": 0.0})
    job = setup.trial_job({TRIAL_NUMBER: 0, RUN_NAME: "trial_0000", "sampler.steps": 3})
    assert (job.evaluation.model_file, job.evaluation.reference_statistics) == (evaluation["model_file"], evaluation["reference_statistics"])
    assert job.run_dir == f"{sweep.folder}/trials/trial_0000" and job.sampler.steps == 3


def test_a_sampling_sweep_without_its_model_file_or_reference_exits_2_before_any_trial(tmp_path, capsys):
    from orchestrator.cli import main

    code = main(["tune", str(SAMPLING_SPEC), f"output_dir={tmp_path}", f"job.output_dir={tmp_path}", "model_file=missing/model.pt"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "sweep 'tune_digits_sampling': its base job" in error
    assert f"{os.getcwd()}/missing/model.pt" in error  # relative to where `tune` runs
    assert "evaluation.reference_statistics: no reference statistics" in error
    assert not (tmp_path / "tune_digits_sampling" / "study.db").exists(), "no study, no cluster, no trial"


def test_a_sweep_over_the_ema_length_of_a_run_without_snapshots_exits_2_before_any_trial(tmp_path, capsys):
    from orchestrator.cli import main

    code = main(["tune", str(SIGMA_REL_SPEC), f"output_dir={tmp_path}", f"job.output_dir={tmp_path}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert f"'{tmp_path}/digits_posthoc/ema_snapshots' holds no EMA snapshots" in error
    assert "train.posthoc_ema_sigma_rels: [0.05, 0.1]" in error
    assert not (tmp_path / "tune_digits_sigma_rel" / "study.db").exists(), "no study, no cluster, no trial"


def _model_file(sweep) -> str:
    return sweep.base_job.evaluation.model_file


@pytest.mark.parametrize(
    ("spec", "override", "read", "expected", "warning"),
    [
        (SAMPLING_SPEC, "checkpoint=/models/model.pt", _model_file, "/models/model.pt", "sweep spec: checkpoint is deprecated"),
        (SAMPLING_SPEC, "job.evaluation.checkpoint=/models/model.pt", _model_file, "/models/model.pt", "job_overrides.evaluation.checkpoint is deprecated"),
        (
            TRAINING_SPEC, "space.evaluation.reference={type: choice, values: [a.npz, b.npz]}", lambda sweep: list(sweep.config.space)[-1],
            "evaluation.reference_statistics", "space.evaluation.reference is deprecated",
        ),
    ],
    ids=["sweep key (the README's old command)", "job_overrides", "space"],
)
def test_renamed_keys_still_work_with_a_warning(spec, override, read, expected, warning, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        sweep = load_sweep(spec, [f"output_dir={tmp_path}", override])
    assert read(sweep) == expected
    assert warning in caplog.text


def test_a_renamed_key_and_its_new_name_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="renamed to evaluation.model_file, and both are set"):
        load_sweep(SAMPLING_SPEC, [f"output_dir={tmp_path}", "job.evaluation.checkpoint=a.pt", "job.evaluation.model_file=b.pt"])


def _suggestions(seed: int, count: int) -> list[dict]:
    """The configs OptunaSearch suggests for the training spec's define-by-run space, each told
    a result that depends on its values, so the model-based phase of TPE is exercised too."""
    from orchestrator.tune.run import build_searcher

    sweep = load_sweep(TRAINING_SPEC, [f"seed={seed}"])
    searcher = build_searcher(sweep, storage_url=None)
    configs = []
    for index in range(count):
        config = searcher.suggest(f"trial_{index}")
        configs.append(config)
        score = 100 * config["train.learning_rate"] + config["sampler.steps"] + config.get("sampler.extrapolation", 0.0)
        searcher.on_trial_complete(f"trial_{index}", {"frechet_distance": score})
    return configs


def test_the_same_seed_suggests_the_same_configs():
    first, again, other = _suggestions(0, 14), _suggestions(0, 14), _suggestions(1, 14)
    assert first == again
    assert first != other
    assert [c["trial_number"] for c in first] == list(range(14))
    # the conditional parameter is suggested exactly when its condition holds
    assert all(("sampler.extrapolation" in c) == (c["sampler.steps"] > 4) for c in first)
    assert any("sampler.extrapolation" in c for c in first) and any("sampler.extrapolation" not in c for c in first)


def test_a_trial_a_kill_cut_off_is_queued_again_with_its_values_and_run_folder(tmp_path):
    """What a restarted sweep does with the Optuna trials the previous run left RUNNING."""
    import optuna

    from orchestrator.tune.space import RUN_NAME
    from orchestrator.tune.run import build_searcher, finished_trials, open_study, settle_interrupted

    sweep = load_sweep(TRAINING_SPEC, [f"output_dir={tmp_path}"])
    study = open_study(sweep)
    searcher = build_searcher(sweep, sweep.storage_url)
    cut, done = searcher.suggest("a"), searcher.suggest("b")  # both RUNNING, as after a kill
    result = Path(sweep.folder) / "trials" / done[RUN_NAME] / "trial_result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"frechet_distance": 12.5, "score_samples": 100, "step": 300}))

    settle_interrupted(sweep, study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING]
    assert trials[0].user_attrs["interrupted"] and trials[1].values == [12.5]
    assert finished_trials(study) == 1  # the interrupted one does not count

    retry = build_searcher(sweep, sweep.storage_url).suggest("c")
    assert retry["trial_number"] == 2 and retry[RUN_NAME] == cut[RUN_NAME] == "trial_0000"
    assert {k: v for k, v in retry.items() if "." in k} == {k: v for k, v in cut.items() if "." in k}


def test_training_reports_a_quick_score_every_score_every_steps(tmp_path):
    """The intermediate metric early stopping reads: every train.score_every steps, on
    evaluation.score_samples samples (here through the single-process backend's MLflow run)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train.run import run_train

    job = load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={tmp_path}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "distributed.backend=local",
            "train.steps=20",
            "train.score_every=10",
            "train.log_every=10",
            "evaluation.score_samples=30",
            "evaluation.num_samples=40",
            "sampler.steps=4",
        ],
    )
    summary = run_train(job)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(summary.mlflow_run_id, "frechet_distance_quick")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [10, 20]
    # a score of the model, not a constant: finite, and ten more steps of training change it
    assert all(math.isfinite(m.value) for m in history) and history[0].value != history[1].value


# --------------------------------------------------------------------------- with a cluster and a model


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module, sized for two trials of a driver and a worker."""
    import ray

    from orchestrator import cluster

    cluster.connect(None, 4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A tiny digits model (single-process backend, a few hundred steps) and its dataset's
    reference statistics: what sampling sweeps score."""
    from orchestrator.sample.reference import run_reference
    from orchestrator.train.run import run_train

    folder = tmp_path_factory.mktemp("model")
    job = load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={folder}",
            "distributed.backend=local",
            "train.steps=250",
            "train.warmup_steps=20",
            "train.log_every=50",
            "train.checkpoint_every=250",
            "train.sample_every=100000",
            "evaluation.num_samples=100",
            "tracking.enabled=false",
            "train.posthoc_ema_sigma_rels=[0.05, 0.1]",  # snapshots for the sweep over the EMA length
            "train.posthoc_ema_every=25",
        ],
    )
    run_train(job)
    run_reference(job)
    return folder


def _sampling_overrides(model_folder: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp}",
        f"job.output_dir={model_folder}",  # the base job's run folder holds the model and the reference
        _tracking(tmp),
        "job.evaluation.num_samples=300",
        "metrics=[frechet_distance]",
        *extra,
    ]


@pytest.fixture(scope="module")
def sampling_sweep(ray_cluster, trained_model, tmp_path_factory):
    from orchestrator.tune.run import run_tune

    tmp = tmp_path_factory.mktemp("sampling")
    sweep = load_sweep(
        SAMPLING_SPEC, _sampling_overrides(trained_model, tmp, "num_trials=6", "space.sampler.steps={type: int, low: 3, high: 6}")
    )
    return sweep, run_tune(sweep)


def test_a_sampling_sweep_finds_a_setting_at_least_as_good_as_the_default_at_its_nfe(sampling_sweep, trained_model):
    from orchestrator.sample.evaluate import run_evaluate

    sweep, summary = sampling_sweep
    assert summary.statuses == {"completed": 6}
    best = summary.best
    completed = [t for t in summary.trials if t.status == "completed"]
    assert best["values"]["frechet_distance"] == min(t.values["frechet_distance"] for t in completed)

    # the base sampler (no extrapolation, no stochasticity) with the best trial's step count
    steps = best["params"]["sampler.steps"]
    default = load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={trained_model}",
            "evaluation.num_samples=300",
            "tracking.enabled=false",
            f"sampler.steps={steps}",
        ],
    )
    assert default.sampler.extrapolation == 0 and default.sampler.stochasticity == 0
    (reference,) = run_evaluate(default).results
    assert reference.nfe == best["values"].get("nfe", steps) == steps
    assert best["values"]["frechet_distance"] <= reference.distance


def test_a_sampling_sweep_writes_table_plot_best_job_and_nested_mlflow_runs(sampling_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.sample.evaluate import run_evaluate

    sweep, summary = sampling_sweep
    folder = Path(sweep.folder)
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [int(r["trial"]) for r in rows] == list(range(6))
    assert [r["trial"] for r in rows if r["best"] == "1"] == [str(summary.best["trial"])]
    # one value per trial, to the last digit, in the table, sweep.json and each trial's result file
    stored = json.loads((folder / "sweep.json").read_text())["trials"]
    for row, trial, record in zip(rows, stored, summary.trials, strict=True):
        result = json.loads((Path(record.run_dir) / "trial_result.json").read_text())
        assert float(row["frechet_distance"]) == trial["values"]["frechet_distance"] == result["frechet_distance"]
        assert math.isfinite(result["frechet_distance"]) and int(row["score_samples"]) == result["score_samples"] == 300
    settings = {tuple(row[key] for key in sweep.config.space) for row in rows}
    assert len({row["frechet_distance"] for row in rows}) == len(settings) == 6, "other sampler settings, other distances"
    assert (folder / "results.png").read_bytes()[:4] == b"\x89PNG"

    # the best job file is a ready-to-run evaluate job that gives the best trial's distance
    job = load_job(folder / "best_job.yaml", ["tracking.enabled=false"])
    (result,) = run_evaluate(job).results
    assert result.distance == pytest.approx(summary.best["values"]["frechet_distance"], rel=1e-9)

    client = MlflowClient(sweep.base_job.tracking.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    assert {c.data.params["sampler.steps"] for c in children} == {str(t.params["sampler.steps"]) for t in summary.trials}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.png", "best_job.yaml", "sweep.json"} <= artifacts
    assert parent.data.metrics["best_frechet_distance"] == summary.best["values"]["frechet_distance"]


@pytest.mark.slow
def test_a_sampling_sweep_over_the_ema_length_scores_each_trial_s_reconstruction(ray_cluster, trained_model, tmp_path):
    """posthoc_ema.sigma_rel as one more sampling key: each trial's evaluate rebuilds that EMA
    from the run's snapshots (the `ema` verb's weights, exactly) and scores it; the best job
    file does the same again."""
    from orchestrator.sample.evaluate import run_evaluate
    from orchestrator.train.posthoc import run_ema
    from orchestrator.tune.run import run_tune
    from ucgm_core.model_file import load_model_file

    sweep = load_sweep(SIGMA_REL_SPEC, _sampling_overrides(trained_model, tmp_path, "job.name=digits", "num_trials=2", "job.evaluation.num_samples=200"))
    summary = run_tune(sweep)
    assert summary.statuses == {"completed": 2}
    distances = set()
    for trial in summary.trials:
        sigma_rel = trial.params["posthoc_ema.sigma_rel"]
        rebuilt = Path(trial.run_dir) / "evaluation" / f"model-sigma_rel-{sigma_rel:.3f}.pt"
        out = tmp_path / f"ema-{trial.number}.pt"
        run_ema(load_job(ROOT / "jobs/digits.yaml", [f"output_dir={trained_model}", f"posthoc_ema.sigma_rel={sigma_rel}", f"posthoc_ema.out={out}"]))
        ours, verbs = (load_model_file(str(path)).model.state_dict() for path in (rebuilt, out))
        assert all(torch.equal(ours[key], verbs[key]) for key in verbs)
        distances.add(trial.values["frechet_distance"])
    assert len(distances) == 2, "other EMA lengths and steps, other distances"

    job = load_job(Path(sweep.folder) / "best_job.yaml", ["tracking.enabled=false"])
    assert job.posthoc_ema.sigma_rel == summary.best["params"]["posthoc_ema.sigma_rel"]
    (result,) = run_evaluate(job).results
    assert result.distance == pytest.approx(summary.best["values"]["frechet_distance"], rel=1e-9)


def _blocked(sweep, *run_names: str) -> None:
    """Make trials fail where a real sweep can: a file where their run folder must go."""
    trials = Path(sweep.folder) / "trials"
    if not run_names:
        trials.parent.mkdir(parents=True)
        trials.write_text("not a folder")
    for name in run_names:
        (trials / name).parent.mkdir(parents=True, exist_ok=True)
        (trials / name).write_text("not a folder")


def test_a_sweep_whose_trials_all_fail_exits_1_with_the_first_trial_s_error(ray_cluster, trained_model, tmp_path, capsys):
    from orchestrator.cli import main

    overrides = _sampling_overrides(trained_model, tmp_path, "num_trials=2", "job.evaluation.num_samples=50")
    _blocked(load_sweep(SAMPLING_SPEC, overrides))
    assert main(["tune", str(SAMPLING_SPEC), *overrides]) == 1
    error = capsys.readouterr().err
    assert "error: all 2 trials of sweep 'tune_digits_sampling' failed; the first, trial_0000" in error
    assert "Not a directory" in error
    rows = list(csv.DictReader((tmp_path / "tune_digits_sampling" / "results.csv").open()))
    assert [row["status"] for row in rows] == ["failed", "failed"]


@pytest.mark.slow
def test_a_sweep_where_some_trials_fail_completes_and_lists_them_as_failed(ray_cluster, trained_model, tmp_path):
    from orchestrator.tune.run import run_tune

    sweep = load_sweep(SAMPLING_SPEC, _sampling_overrides(trained_model, tmp_path, "num_trials=2", "job.evaluation.num_samples=50"))
    _blocked(sweep, "trial_0001")
    summary = run_tune(sweep)
    assert summary.complete and summary.statuses == {"completed": 1, "failed": 1}
    rows = list(csv.DictReader((Path(sweep.folder) / "results.csv").open()))
    assert [(row["trial"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert math.isfinite(float(rows[0]["frechet_distance"])) and rows[1]["frechet_distance"] == ""


def _completed_trials(sweep) -> dict[int, tuple]:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not Path(sweep.storage_url.removeprefix("sqlite:///")).exists():
        return {}
    try:
        study = optuna.load_study(study_name=sweep.config.name, storage=sweep.storage_url)
    except KeyError:  # not created yet
        return {}
    except SQLAlchemyError:  # the sweep's process is creating the tables right now (both write alembic_version)
        return {}
    return {t.number: (t.params, t.values) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}


@pytest.mark.slow  # ~2 min; the default run re-queues a cut-off trial in test_a_trial_a_kill_cut_off_is_queued_again...
def test_a_killed_sweep_continues_with_the_trials_it_had_finished(ray_cluster, trained_model, tmp_path):
    from orchestrator.tune.run import run_tune

    overrides = _sampling_overrides(trained_model, tmp_path, "num_trials=4", "max_concurrent_trials=1")
    sweep = load_sweep(SAMPLING_SPEC, overrides)
    log = (tmp_path / "first.log").open("w")
    # its own local Ray cluster (not this module's), so that the kill takes the cluster with it
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "tune", str(SAMPLING_SPEC), *overrides],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment,
    )
    try:
        deadline = time.monotonic() + 600
        while not _completed_trials(sweep) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        assert first.poll() is None, f"the first run ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep's process group: its driver and its local Ray cluster
        first.wait()

    before = _completed_trials(sweep)
    assert 1 <= len(before) < 4

    summary = run_tune(sweep)
    finished = _completed_trials(sweep)
    assert all(finished[number] == kept for number, kept in before.items())  # kept, not run again
    assert summary.statuses["completed"] == 4 == len(finished)
    # a trial the kill cut off ran again with the same values, in the same run folder
    interrupted = [t for t in summary.trials if t.status == "interrupted"]
    assert summary.statuses.get("interrupted", 0) == len(interrupted) <= 1
    for cut in interrupted:
        (retry,) = [t for t in summary.trials if t.run_dir == cut.run_dir and t.number != cut.number]
        assert retry.status == "completed" and retry.params == cut.params
    state = json.loads(storage.read_bytes(f"{sweep.folder}/sweep_state.json"))
    assert [session["complete"] for session in state["sessions"]] == [False, True]


# --------------------------------------------------------------------------- training sweeps (slow)


@pytest.mark.slow
def test_a_training_sweep_stops_weak_trials_early_and_its_best_job_reproduces_its_score(ray_cluster, tmp_path):
    """5 trials of 40 steps, 2 at a time: real Ray Train + DeepSpeed runs inside Tune, ASHA on
    the quick score at step 20 (a fast EMA, so that 20 steps show in the samples)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train.run import run_train
    from orchestrator.tune.run import run_tune

    sweep = load_sweep(
        TRAINING_SPEC,
        [
            f"output_dir={tmp_path}",
            _tracking(tmp_path),
            "num_trials=5",
            "max_concurrent_trials=2",
            "early_stopping.grace_period=20",
            "job.train.steps=40",
            "job.train.warmup_steps=5",
            "job.train.ema_decay=0.9",
            "job.train.score_every=20",
            "job.train.log_every=10",
            "job.train.checkpoint_every=20",
            "job.evaluation.score_samples=50",
            "job.evaluation.num_samples=100",
            "space.sampler.steps={type: int, low: 3, high: 6}",
        ],
    )
    summary = run_tune(sweep)
    completed = [t for t in summary.trials if t.status == "completed"]
    stopped = [t for t in summary.trials if t.status == "stopped"]
    assert len(completed) + len(stopped) == 5
    assert completed and stopped, summary.statuses
    assert all(t.steps < 40 for t in stopped) and all(t.steps == 40 for t in completed)
    best = summary.best
    assert best["values"]["frechet_distance"] == min(t.values["frechet_distance"] for t in completed)

    client = MlflowClient(sweep.base_job.tracking.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"trial_{n:04d}" for n in range(5)]
    assert {c.info.status for c in children if c.info.run_name in {f"trial_{t.number:04d}" for t in stopped}} == {"KILLED"}

    rerun = run_train(load_job(Path(sweep.folder) / "best_job.yaml", ["tracking.enabled=false"]))
    assert rerun.frechet_trained == pytest.approx(best["values"]["frechet_distance"], rel=1e-6)
