"""The `tune` verb: a hyperparameter search over a job's keys with Ray Tune, Optuna and ASHA.

    Tuner ── OptunaSearch (define-by-run space, TPE / random / NSGA-II, seeded; the study in an
       │                   RDB store, sqlite under the sweep folder by default)
       │  ── ASHAScheduler on the quick score training reports every train.score_every steps
       └── one Tune function per trial:
             train mode:  builds the trial's job and runs the real trainer, a Ray Train
                          TorchTrainer + DeepSpeed (orchestrator.train.ray_backend), whose reports reach
                          Tune through a TuneReportCallback (Train V2's Tune integration); the
                          final score on evaluation.num_samples is the trial's last result
             sample mode: runs the real evaluator (orchestrator.sample.evaluate) on one checkpoint with
                          the trial's sampler settings

Resources: Tune reserves a trial's driver (driver_cpus); the Train worker group reserves its own
placement group and Ray Data schedules its actors and tasks outside the caller's, so the number
of trials that run at once is computed here from what a whole trial needs against what the
cluster has.

Interruption: the Optuna study is the sweep's record; running the same command again continues
it. Trials that ended count towards num_trials and inform the sampler; a trial a kill cut off is
queued again with the same values and the same run folder, so its training resumes from its
newest Ray Train checkpoint. Each run is a new Tune session (<sweep folder>/tune/session_NNN).
Tuner.restore is not used: Tune snapshots its experiment every few seconds while OptunaSearch
tells the study at once, so after a kill in between a restored Tune re-runs a trial the study
has already closed and OptunaSearch fails on it (optuna UpdateFinishedTrialError); the study
alone has no such gap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from orchestrator import cluster, storage
from orchestrator.config import JobConfig, validate_job
from orchestrator.errors import ConfigError, JobError, ResourceError
from orchestrator.tune.space import RESUMES, RUN_NAME, TRIAL_NUMBER, SearchSpace, run_name, trial_name
from orchestrator.tune.spec import Sweep
from orchestrator.tune.report import INTERRUPTED, TRIAL_RESULT_FILE, SweepSummary, report_sweep
from orchestrator.tracking import default_tracking_uri, open_tracker

logger = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
SCORE = "frechet_distance"


# --------------------------------------------------------------------------- inside a trial


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the driver (travels with the trainable)."""

    sweep: Sweep
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    gpus_per_actor: float = 0.0

    def trial_job(self, config: dict[str, Any]) -> JobConfig:
        """The base job with the trial's values, its own run folder and a child MLflow run."""
        sweep = self.sweep
        raw = sweep.job_raw(SearchSpace(sweep.config.space).job_params(config))
        raw["name"] = config[RUN_NAME]
        raw["output_dir"] = storage.join(sweep.folder, "trials")
        tracking = raw.setdefault("tracking", {})
        tracking.update(tracking_uri=self.tracking_uri, experiment=self.experiment, parent_run_id=self.parent_run_id)
        if sweep.config.mode == "sample":
            evaluation = raw.setdefault("evaluation", {})
            evaluation.update(model_file=sweep.model_file, reference_statistics=sweep.reference_statistics, sampler_grid=[], gpus_per_actor=self.gpus_per_actor)
        return validate_job(raw)


def _report_final(job: JobConfig, config: dict[str, Any], result: dict[str, Any]) -> None:
    """The trial's result file (what the sweep's table reads), then its last Tune result."""
    import ray.tune

    record = {TRIAL_NUMBER: config[TRIAL_NUMBER], "config": config, **result}
    storage.write_bytes(storage.join(job.run_dir, TRIAL_RESULT_FILE), json.dumps(record, indent=2).encode())
    ray.tune.report({**result, "final": True})


def training_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function: the real trainer (Ray Train + DeepSpeed) on the trial's job."""
    from ucgm_core.sampler import count_network_evaluations

    from orchestrator.train.ray_backend import run_train_ray

    job = setup.trial_job(config)
    nfe = count_network_evaluations(job.sampler)
    summary = run_train_ray(job, callbacks=(_score_reports(job.train.steps, {"nfe": nfe}),))
    if summary.frechet_trained is None:
        raise JobError(f"trial {job.name} ended without a quality score; only grey-image datasets are scored during training")
    result = {
        SCORE: summary.frechet_trained,
        "score_samples": job.evaluation.num_samples,
        "nfe": nfe,
        "train_seconds": summary.seconds,
        "step": summary.steps,
    }
    _report_final(job, config, result)


def sampling_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function: the real evaluator (Ray Data) on the sweep's checkpoint with the trial's
    sampler settings."""
    from orchestrator.sample.evaluate import run_evaluate

    job = setup.trial_job(config)
    summary = run_evaluate(job)
    (scored,) = summary.results
    result = {SCORE: scored.distance, "score_samples": summary.num_samples, "nfe": scored.nfe, "seconds": summary.seconds}
    _report_final(job, config, result)


def _score_reports(last_step: int, constants: dict[str, float]):
    """Train V2's TuneReportCallback forwards every worker report to the Tune trial. Tune wants
    the searched metric in every result, so only the reports that carry the quick score go
    through, with the trial's constant metrics added; the one at the last step is left out
    because the trial's final result (on more samples) stands for that step."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0]
            if SCORE not in first or first.get("step", 0) >= last_step:
                return
            super().after_report(run_context, [{**first, **constants}, *metrics[1:]], checkpoint)

    return ScoreReports()


# --------------------------------------------------------------------------- the driver


def build_searcher(sweep: Sweep, storage_url: str | None):
    """OptunaSearch over the sweep's define-by-run space: the chosen Optuna sampler seeded with
    `seed`, the study in `storage_url` (None: in memory), every metric minimised."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    config = sweep.config
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "nsga2": optuna.samplers.NSGAIISampler}
    metrics = list(config.metrics)
    return OptunaSearch(
        space=SearchSpace(config.space),
        metric=metrics if config.multi_objective else metrics[0],
        mode=["min"] * len(metrics) if config.multi_objective else "min",
        sampler=samplers[config.optuna_sampler](seed=config.seed),
        study_name=config.name,
        storage=_rdb_storage(storage_url) if storage_url else None,
    )


def build_scheduler(sweep: Sweep):
    """ASHA on the quick score, by training step; None when there is nothing to stop early."""
    from ray.tune.schedulers import ASHAScheduler

    config, train = sweep.config, sweep.base_job.train
    if config.mode != "train" or not config.early_stopping.enabled:
        return None
    return ASHAScheduler(
        time_attr="step",
        metric=SCORE,
        mode="min",
        max_t=sweep.max_steps,
        grace_period=config.early_stopping.grace_period or train.score_every,
        reduction_factor=config.early_stopping.reduction_factor,
        stop_last_trials=False,  # a trial at its last step still reports its final score
    )


def _rdb_storage(url: str):
    import optuna

    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url.removeprefix("sqlite:///")), exist_ok=True)
    return optuna.storages.RDBStorage(url)


@dataclass(frozen=True)
class TrialResources:
    cpus: float  # the whole trial: its driver plus the training workers or the evaluation actors
    gpus: float
    request: dict[str, float]  # what Tune reserves: the driver alone


def trial_resources(sweep: Sweep, gpus_per_actor: float) -> TrialResources:
    """Ray Train places its workers in a placement group of its own and Ray Data schedules its
    actors and tasks outside the caller's, so Tune reserves only a trial's driver and
    `concurrent_trials` limits how many whole trials run at once."""
    config, job = sweep.config, sweep.base_job
    if config.mode == "train":
        distributed = job.distributed
        workers = (distributed.num_workers * distributed.cpus_per_worker, distributed.num_workers * distributed.gpus_per_worker)
    else:
        evaluation = job.evaluation
        workers = (evaluation.num_actors * evaluation.cpus_per_actor, evaluation.num_actors * gpus_per_actor)
    return TrialResources(config.driver_cpus + workers[0], workers[1], {"CPU": config.driver_cpus})


def concurrent_trials(sweep: Sweep, resources: TrialResources, remaining: int) -> int:
    """How many whole trials the cluster holds at once, capped by max_concurrent_trials."""
    total, _ = cluster.capacity()
    fits = math.floor(total.get("CPU", 0) / resources.cpus + 1e-9)
    if resources.gpus:
        fits = min(fits, math.floor(total.get("GPU", 0) / resources.gpus + 1e-9))
    if fits < 1:
        raise ResourceError(
            f"one trial needs {resources.cpus:g} CPUs and {resources.gpus:g} GPUs (driver_cpus plus the job's workers or "
            f"evaluation actors) but the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
            "lower driver_cpus or the job's distributed/evaluation resources, or add nodes"
        )
    return max(1, min(sweep.config.max_concurrent_trials or remaining, remaining, fits))


def _check_sampling_inputs(sweep: Sweep) -> None:
    """The checkpoint and the reference statistics a sampling sweep scores against exist (and
    match), before any trial starts."""
    from orchestrator.sample.reference import load_reference, reference_path
    from orchestrator.sample.extractors import extractor_spec
    from orchestrator.sample.model_files import read_model_file

    job = validate_job(sweep.job_raw({"evaluation.model_file": sweep.model_file, "evaluation.reference_statistics": sweep.reference_statistics}))
    _, contents = read_model_file(job)
    spec = extractor_spec(job, (contents.in_channels, contents.input_size, contents.input_size))
    load_reference(reference_path(job), spec.build("cpu").identifier())


def _study(sweep: Sweep):
    """The sweep's Optuna study (created or loaded), refused when it was made for another
    space or other metrics: its history would not describe this search."""
    import optuna

    config = sweep.config
    fingerprint = json.dumps(
        {"mode": config.mode, "metrics": list(config.metrics), "space": {k: v.model_dump() for k, v in config.space.items()}}, sort_keys=True
    )
    study = optuna.create_study(
        study_name=config.name,
        storage=_rdb_storage(sweep.storage_url),
        directions=["minimize"] * len(config.metrics),
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("sweep")
    if recorded is None:
        study.set_user_attr("sweep", fingerprint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.metrics))  # shown by Optuna's own tools (optuna-dashboard)
    elif recorded != fingerprint:
        raise ConfigError(
            f"invalid sweep spec:\n  storage: the study {config.name!r} in {sweep.storage_url} was made for another mode, "
            "metrics or search space; restore those, or start a new sweep (another name, or delete the study)"
        )
    return study


def finished_trials(study) -> int:
    """Trials that count towards num_trials: ended, except those a kill interrupted (retried)."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get(INTERRUPTED))


def settle_interrupted(sweep: Sweep, study) -> None:
    """Optuna trials still RUNNING when a sweep starts were cut off by a kill of the previous
    run (one `tune` process per study). One that wrote its result before the kill is told its
    result; any other ends as FAIL, marked interrupted (not counted), and is queued again with
    the same values and the same run folder, so its training resumes from its checkpoints."""
    import optuna
    from optuna.trial import TrialState

    metrics = list(sweep.config.metrics)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        result_path = storage.join(sweep.folder, "trials", run_name(trial), TRIAL_RESULT_FILE)
        if storage.exists(result_path):
            result = json.loads(storage.read_bytes(result_path))
            study.tell(trial.number, [result[m] for m in metrics])
            logger.info("trial %d had finished before the interruption; its result is recorded", trial.number)
            continue
        optuna.trial.Trial(study, trial._trial_id).set_user_attr(INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={RESUMES: trial.user_attrs.get(RESUMES, trial.number)})
        logger.info("trial %d was interrupted; it runs again with the same values, resuming %s", trial.number, run_name(trial))


class _State:
    """<sweep folder>/sweep_state.json: the MLflow parent run and the Tune sessions run so far."""

    def __init__(self, folder: str):
        self.path = storage.join(folder, STATE_FILE)
        self.data: dict[str, Any] = json.loads(storage.read_bytes(self.path)) if storage.exists(self.path) else {"sessions": []}

    def save(self) -> None:
        storage.write_bytes(self.path, json.dumps(self.data, indent=2).encode())

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return self.data["sessions"]


def _trial_label(trial) -> str:
    """Tune's name for a trial: its Optuna number, and the run it resumes if it is a retry."""
    label, runs = trial_name(trial.config[TRIAL_NUMBER]), trial.config[RUN_NAME]
    return label if runs == label else f"{label}_resumes_{runs}"


def run_tune(sweep: Sweep) -> SweepSummary:
    """Run the sweep, or continue it: trials already ended in its study count towards
    num_trials; write its table, plot, best job and MLflow runs."""
    import ray.tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    started = time.perf_counter()
    config, job = sweep.config, sweep.base_job
    storage.check_writable(sweep.folder)
    if config.mode == "sample":
        _check_sampling_inputs(sweep)
    study = _study(sweep)
    settle_interrupted(sweep, study)
    remaining = config.num_trials - finished_trials(study)

    # the local cluster (when the job names none) is sized for max_concurrent_trials whole trials
    preview = trial_resources(sweep, gpus_per_actor=0.0)
    cluster.connect(job.distributed.ray_address, (config.max_concurrent_trials or 1) * preview.cpus)
    gpus_per_actor = 0.0
    if config.mode == "sample":
        from orchestrator.actor_pools import actor_resources

        gpus_per_actor = actor_resources(job).gpus
    else:
        d = job.distributed
        cluster.check_fits(
            d.num_workers, {"CPU": d.cpus_per_worker, "GPU": d.gpus_per_worker}, f"{d.num_workers} training workers of each trial",
            "lower distributed.num_workers, cpus_per_worker or gpus_per_worker in job_overrides",
        )
    resources = trial_resources(sweep, gpus_per_actor)

    state = _State(sweep.folder)
    tracking_uri = _absolute_tracking_uri(job)
    experiment = job.tracking.experiment or config.name
    parent = open_tracker(job.tracking.enabled, tracking_uri, experiment, run_id=state.data.get("mlflow_run_id"), run_name=config.name)
    state.data["mlflow_run_id"] = parent.run_id
    state.save()
    complete = True
    try:
        parent.set_tags({"verb": "tune", "sweep_folder": sweep.folder, "study": sweep.storage_url, "mode": config.mode})
        parent.log_params(_sweep_params(sweep))
        if remaining > 0:
            concurrency = concurrent_trials(sweep, resources, remaining)
            session = {"name": f"session_{len(state.sessions):03d}", "num_samples": remaining, "complete": False}
            state.sessions.append(session)
            state.save()
            logger.info(
                "sweep %s: %d trials to run (%d ended before), %d at once (each %g CPUs, %g GPUs)",
                config.name, remaining, config.num_trials - remaining, concurrency, resources.cpus, resources.gpus,
            )
            function = training_trial if config.mode == "train" else sampling_trial
            setup = TrialSetup(sweep, tracking_uri, experiment, parent.run_id, gpus_per_actor)
            tuner = Tuner(
                ray.tune.with_resources(ray.tune.with_parameters(function, setup=setup), resources.request),
                tune_config=TuneConfig(
                    search_alg=build_searcher(sweep, sweep.storage_url),
                    scheduler=build_scheduler(sweep),
                    num_samples=remaining,
                    max_concurrent_trials=concurrency,
                    trial_name_creator=_trial_label,
                    trial_dirname_creator=_trial_label,
                ),
                run_config=RunConfig(
                    name=session["name"],
                    storage_path=storage.join(sweep.folder, "tune"),
                    failure_config=FailureConfig(max_failures=0, fail_fast=False),
                    verbose=1,
                ),
            )
            grid = tuner.fit()
            complete = len(grid) == remaining and grid.num_terminated + grid.num_errors == len(grid)
            session["complete"] = complete
            state.save()
            if not complete:
                logger.warning("the sweep was interrupted; run the same command again to continue it")
        logged = set(state.data.get("logged_trials", []))
        summary = report_sweep(sweep, study, parent, complete=complete, seconds=time.perf_counter() - started, logged=logged)
        state.data["logged_trials"] = sorted(logged)
        state.save()
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED" if complete else "KILLED")
    return summary


def _absolute_tracking_uri(job: JobConfig) -> str:
    uri = job.tracking.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    return uri


def _sweep_params(sweep: Sweep) -> dict[str, Any]:
    config = sweep.config.model_dump(mode="json", exclude={"space"})
    params = {f"sweep.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in config.items()}
    params.update({f"space.{k}": json.dumps(v.model_dump(exclude_none=True)) for k, v in sweep.config.space.items()})
    return params


def check_sweep(sweep: Sweep) -> dict[str, Any]:
    """What `tune --check` prints: the sweep resolved, the base job and one example trial job."""
    example = {key: distribution.extremes()[0] for key, distribution in sweep.config.space.items()}
    return {
        "sweep": sweep.config.model_dump(mode="json"),
        "folder": sweep.folder,
        "study": sweep.storage_url,
        "example_trial_job": validate_job(sweep.job_raw(example)).model_dump(mode="json"),
    }
