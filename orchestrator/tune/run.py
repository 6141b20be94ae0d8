"""The driver of the `tune` verb: a hyperparameter search over a job's keys with Ray Tune,
Optuna and ASHA.

    Tuner ── OptunaSearch (define-by-run space, TPE / random / NSGA-II, seeded; the study in an
       │                   RDB store, sqlite under the sweep folder by default)
       │  ── the mode's scheduler: ASHA on the quick score of a training sweep (orchestrator.tune.modes)
       └── one Tune function per trial, the mode's (orchestrator.tune.trials): the real trainer
           (Ray Train + DeepSpeed) or the real evaluator (Ray Data) on the trial's job

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

Failure: a sweep whose trials all fail raises the first one's error (a broken input or job, not
bad luck with its values); one where only some fail completes and lists them as failed.
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
from orchestrator.config import validate_job
from orchestrator.errors import ConfigError, JobError, ResourceError
from orchestrator.tune.modes import Workers
from orchestrator.tune.report import INTERRUPTED, SweepSummary, report_sweep
from orchestrator.tune.space import RESUMES, RUN_NAME, TRIAL_NUMBER, SearchSpace, run_name, trial_name
from orchestrator.tune.spec import Sweep
from orchestrator.tune.trials import TRIAL_RESULT_FILE, TrialSetup
from orchestrator.tracking import default_tracking_uri, open_tracker

logger = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"


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


def trial_resources(sweep: Sweep, workers: Workers) -> TrialResources:
    """Ray Train places its workers in a placement group of its own and Ray Data schedules its
    actors and tasks outside the caller's, so Tune reserves only a trial's driver and
    `concurrent_trials` limits how many whole trials run at once."""
    driver = sweep.config.driver_cpus
    return TrialResources(driver + workers.cpus, workers.gpus, {"CPU": driver})


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


def open_study(sweep: Sweep):
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
    num_trials; write its table, plot, best job and MLflow runs. Raises JobError (ConfigError
    for a config problem) with the first trial's error when every trial of this run failed."""
    started = time.perf_counter()
    config, job, mode = sweep.config, sweep.base_job, sweep.mode
    storage.check_writable(sweep.folder)
    mode.check_inputs(sweep)
    study = open_study(sweep)
    settle_interrupted(sweep, study)
    remaining = config.num_trials - finished_trials(study)

    # the local cluster (when the job names none) is sized for max_concurrent_trials whole trials
    cluster.connect(job.distributed.ray_address, (config.max_concurrent_trials or 1) * (config.driver_cpus + mode.worker_cpus(job)))
    workers = mode.place_workers(job)

    state = _State(sweep.folder)
    tracking_uri = job.tracking.tracking_uri or default_tracking_uri()  # absolute: load_sweep resolved it
    experiment = job.tracking.experiment or config.name
    parent = open_tracker(job.tracking.enabled, tracking_uri, experiment, run_id=state.data.get("mlflow_run_id"), run_name=config.name)
    state.data["mlflow_run_id"] = parent.run_id
    state.save()
    complete = True
    try:
        parent.set_tags({"verb": "tune", "sweep_folder": sweep.folder, "study": sweep.storage_url, "mode": config.mode})
        parent.log_params(_sweep_params(sweep))
        grid = None
        if remaining > 0:
            setup = TrialSetup(sweep, tracking_uri, experiment, parent.run_id, workers.job_values)
            grid = _run_session(sweep, state, setup, trial_resources(sweep, workers), remaining)
            complete = len(grid) == remaining and grid.num_terminated + grid.num_errors == len(grid)
            state.sessions[-1]["complete"] = complete
            state.save()
            if not complete:
                logger.warning("the sweep was interrupted; run the same command again to continue it")
        logged = set(state.data.get("logged_trials", []))
        summary = report_sweep(sweep, study, parent, complete=complete, seconds=time.perf_counter() - started, logged=logged)
        state.data["logged_trials"] = sorted(logged)
        state.save()
        if grid is not None and len(grid) and grid.num_errors == len(grid):
            raise first_trial_error(sweep, grid)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED" if complete else "KILLED")
    return summary


def _run_session(sweep: Sweep, state: _State, setup: TrialSetup, resources: TrialResources, remaining: int):
    """One Tune session of `remaining` trials, recorded in the sweep state; its ResultGrid."""
    import ray.tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    config, mode = sweep.config, sweep.mode
    concurrency = concurrent_trials(sweep, resources, remaining)
    session = {"name": f"session_{len(state.sessions):03d}", "num_samples": remaining, "complete": False}
    state.sessions.append(session)
    state.save()
    logger.info(
        "sweep %s: %d trials to run (%d ended before), %d at once (each %g CPUs, %g GPUs)",
        config.name, remaining, config.num_trials - remaining, concurrency, resources.cpus, resources.gpus,
    )
    tuner = Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(mode.trainable(), setup=setup), resources.request),
        tune_config=TuneConfig(
            search_alg=build_searcher(sweep, sweep.storage_url),
            scheduler=mode.scheduler(sweep),
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
    return tuner.fit()


def first_trial_error(sweep: Sweep, grid) -> JobError:
    """The error of the lowest-numbered failed trial of a Tune ResultGrid, as the JobError the
    CLI prints (a ConfigError stays one, so the exit code says it is the config). Tune hands
    back what the trial raised wrapped in a RayTaskError whose `cause` is the original; a
    trial whose actor died has a TuneError only."""
    failed = sorted((result for result in grid if result.error is not None), key=lambda result: result.config[TRIAL_NUMBER])
    first = failed[0]
    cause = getattr(first.error, "cause", None) or first.error
    message = str(cause) if isinstance(cause, JobError) else f"{type(cause).__name__}: {cause}"
    error = ConfigError if isinstance(cause, ConfigError) else JobError
    return error(
        f"all {len(failed)} trials of sweep {sweep.config.name!r} failed; the first, {trial_name(first.config[TRIAL_NUMBER])} "
        f"(run folder {storage.join(sweep.folder, 'trials', first.config[RUN_NAME])}, Tune folder {first.path}), with: {message}"
    )


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
