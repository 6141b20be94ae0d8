"""What a sweep leaves in its folder and in its MLflow parent run: the table of trials
(results.csv), a plot (objective vs trial; the Pareto front of a multi-objective sweep), the
best trial as a ready-to-run job (best_job.yaml) and sweep.json.

The Optuna study is the record of every trial (parameters, state, the values Tune told it);
each trial that ran to its end also leaves trial_result.json in its run folder with the final
score on evaluation.num_samples. A trial early stopping ended has no such file: Ray's
OptunaSearch tells the study the quick score it was stopped at, which the table shows with its
sample count but which never competes for the best trial or the Pareto front.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator import storage
from orchestrator.summary import VerbSummary
from orchestrator.tracking import Tracker
from orchestrator.tune.space import SearchSpace, run_name
from orchestrator.tune.spec import Sweep
from orchestrator.tune.trials import TRIAL_RESULT_FILE

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of an Optuna trial a kill cut off (it was queued again)
BEST_JOB_FILE = "best_job.yaml"


@dataclass
class TrialRecord:
    number: int
    status: str  # completed | stopped (early stopping) | failed | interrupted (a kill; retried) | running | waiting
    params: dict[str, Any]  # the suggested job values (a conditional one only when suggested)
    values: dict[str, float]  # per metric: the final values, or for a stopped trial the last reported
    score_samples: int | None
    steps: int | None
    run_dir: str


@dataclass
class SweepSummary(VerbSummary):
    folder: str
    study: str
    mode: str
    metrics: list[str]
    num_trials: int
    statuses: dict[str, int]
    best: dict[str, Any] | None  # trial, values, params, job file
    pareto_front: list[int]  # trial numbers, multi-objective sweeps
    complete: bool
    seconds: float
    mlflow_run_id: str | None
    trials: list[TrialRecord]


def collect_trials(sweep: Sweep, study) -> list[TrialRecord]:
    from optuna.trial import TrialState

    metrics, space = list(sweep.config.metrics), SearchSpace(sweep.config.space)
    records = []
    for trial in study.get_trials(deepcopy=False):
        run_dir = storage.join(sweep.folder, "trials", run_name(trial))
        result_path = storage.join(run_dir, TRIAL_RESULT_FILE)
        params = space.job_params(trial.params)
        if trial.user_attrs.get(INTERRUPTED):
            record = TrialRecord(trial.number, "interrupted", params, {}, None, None, run_dir)  # retried by a later trial
        elif storage.exists(result_path) and trial.state == TrialState.COMPLETE:
            result = json.loads(storage.read_bytes(result_path))
            record = TrialRecord(trial.number, "completed", params, {m: result[m] for m in metrics}, result["score_samples"], result.get("step"), run_dir)
        elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            values = dict(zip(metrics, trial.values)) if trial.values else {}
            record = TrialRecord(trial.number, "stopped", params, values, sweep.base_job.evaluation.score_samples, _last_step(run_dir), run_dir)
        else:
            status = {TrialState.FAIL: "failed", TrialState.WAITING: "waiting"}.get(trial.state, "running")
            record = TrialRecord(trial.number, status, params, {}, None, _last_step(run_dir), run_dir)
        records.append(record)
    return records


def _last_step(run_dir: str) -> int | None:
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return None
    lines = [line for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else None


def pareto_front(records: list[TrialRecord], metrics: list[str]) -> list[TrialRecord]:
    """The completed trials no other completed trial beats on every metric (all minimised)."""
    completed = [r for r in records if r.status == "completed"]

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        return all(a.values[m] <= b.values[m] for m in metrics) and any(a.values[m] < b.values[m] for m in metrics)

    return [r for r in completed if not any(dominates(other, r) for other in completed)]


def best_job_yaml(sweep: Sweep, best: TrialRecord) -> str:
    """The base job with the best trial's values, for the mode's verb: `python -m orchestrator
    train|evaluate <file>` (a sampling sweep's base job names its model file and reference)."""
    raw = sweep.job_raw(best.params)
    raw["name"] = f"{sweep.config.name}_best"
    raw["output_dir"] = sweep.folder
    verb = sweep.mode.verb
    scores = ", ".join(f"{m} {best.values[m]:.6g}" for m in sweep.config.metrics)
    header = (
        f"# Best trial of sweep {sweep.config.name!r}: trial {best.number}, {best.run_dir} ({scores}; {best.score_samples} samples).\n"
        f"# Run it with: python -m orchestrator {verb} {storage.join(sweep.folder, BEST_JOB_FILE)}\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False)


def results_csv(sweep: Sweep, records: list[TrialRecord], front: list[TrialRecord], best: TrialRecord | None) -> bytes:
    metrics, keys, columns = list(sweep.config.metrics), list(sweep.config.space), sweep.mode.report_columns
    on_front = {r.number for r in front}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "status", *keys, *metrics, *columns, "best", "pareto_optimal", "run_dir"])
    for record in records:
        writer.writerow(
            [
                record.number,
                record.status,
                *(json.dumps(record.params[k]) if isinstance(record.params.get(k), list) else record.params.get(k, "") for k in keys),
                *(repr(record.values[m]) if m in record.values else "" for m in metrics),
                *("" if getattr(record, column) is None else getattr(record, column) for column in columns),
                int(best is not None and record.number == best.number),
                int(record.number in on_front),
                record.run_dir,
            ]
        )
    return buffer.getvalue().encode()


def results_plot(sweep: Sweep, records: list[TrialRecord], front: list[TrialRecord]) -> bytes:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot

    metrics = list(sweep.config.metrics)
    score = metrics[0]
    figure, axes = pyplot.subplots(1, 2 if len(metrics) > 1 else 1, figsize=(11 if len(metrics) > 1 else 6, 4), dpi=100, squeeze=False)
    left = axes[0][0]
    completed = [r for r in records if r.status == "completed"]
    stopped = [r for r in records if r.status == "stopped" and score in r.values]
    left.plot([r.number for r in completed], [r.values[score] for r in completed], "o", label="completed (final score)")
    if stopped:
        left.plot([r.number for r in stopped], [r.values[score] for r in stopped], "x", color="grey", label="stopped early (quick score)")
    best_so_far, line = float("inf"), []
    for record in completed:
        best_so_far = min(best_so_far, record.values[score])
        line.append((record.number, best_so_far))
    if line:
        left.step(*zip(*line), where="post", color="C1", alpha=0.6, label="best so far")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("trial")
    left.set_ylabel(f"{score} (lower is better)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    if len(metrics) > 1:
        right, other = axes[0][1], metrics[1]
        right.plot([r.values[other] for r in completed], [r.values[score] for r in completed], "o", color="grey", alpha=0.6, label="completed")
        ordered = sorted(front, key=lambda r: r.values[other])
        right.plot([r.values[other] for r in ordered], [r.values[score] for r in ordered], "o-", color="C3", label="Pareto front")
        for record in ordered:
            right.annotate(str(record.number), (record.values[other], record.values[score]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        right.set_xlabel(other)
        right.set_ylabel(score)
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
    figure.suptitle(f"sweep {sweep.config.name}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def report_sweep(sweep: Sweep, study, parent: Tracker, *, complete: bool, seconds: float, logged: set[int]) -> SweepSummary:
    """Write the sweep's outputs to its folder and its MLflow parent run. `logged`: the trials
    whose metrics the parent run holds already (from earlier runs of the sweep); updated."""
    metrics = list(sweep.config.metrics)
    records = collect_trials(sweep, study)
    completed = [r for r in records if r.status == "completed"]
    best = min(completed, key=lambda r: r.values[metrics[0]]) if completed else None
    front = pareto_front(records, metrics) if len(metrics) > 1 else []
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record.status] = statuses.get(record.status, 0) + 1

    artifacts = {"results.csv": results_csv(sweep, records, front, best), "results.png": results_plot(sweep, records, front)}
    if best is not None:
        artifacts[BEST_JOB_FILE] = best_job_yaml(sweep, best).encode()
    summary = SweepSummary(
        folder=sweep.folder,
        study=sweep.storage_url,
        mode=sweep.config.mode,
        metrics=metrics,
        num_trials=sweep.config.num_trials,
        statuses=statuses,
        best=None
        if best is None
        else {"trial": best.number, "values": best.values, "params": best.params, "job_file": storage.join(sweep.folder, BEST_JOB_FILE)},
        pareto_front=[r.number for r in front],
        complete=complete,
        seconds=round(seconds, 2),
        mlflow_run_id=parent.run_id,
        trials=records,
    )
    artifacts["sweep.json"] = summary.to_json().encode()
    for name, data in artifacts.items():
        storage.write_bytes(storage.join(sweep.folder, name), data)
        parent.log_artifact_bytes(data, name)

    for record in completed:
        if record.number not in logged:
            parent.log_metrics({m: record.values[m] for m in metrics}, step=record.number)
            logged.add(record.number)
    if best is not None:
        parent.log_metrics({f"best_{m}": best.values[m] for m in metrics}, step=best.number)
        parent.set_tags({"best_trial": str(best.number), "best_run_dir": best.run_dir})
    if complete:
        parent.finish_children("KILLED")  # trials stopped early: their process ended with the stop
    logger.info(
        "sweep %s: %s; best %s", sweep.config.name, ", ".join(f"{n} {s}" for s, n in statuses.items()),
        f"trial {best.number} {metrics[0]} {best.values[metrics[0]]:.4f}" if best else "none completed",
    )
    return summary
