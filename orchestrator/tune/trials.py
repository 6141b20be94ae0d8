"""Inside a trial: the Tune functions a sweep's trials run, and the trial's job.

    training_trial  builds the trial's job and runs the real trainer, a Ray Train TorchTrainer +
                    DeepSpeed (orchestrator.train.ray_backend), whose reports reach Tune through a
                    TuneReportCallback (Train V2's Tune integration); the final score on
                    evaluation.num_samples is the trial's last result
    sampling_trial  runs the real evaluator (orchestrator.sample.evaluate) on the sweep's model
                    file with the trial's sampler settings

A trial runs in Tune's per-trial working directory, not where `tune` was started: every path
of the job it builds was made absolute on the driver (orchestrator.tune.spec.load_sweep).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.config import JobConfig, validate_job
from orchestrator.errors import JobError
from orchestrator.train import checkpoint_scores
from orchestrator.tune.modes import SCORE
from orchestrator.tune.space import RUN_NAME, TRIAL_NUMBER, SearchSpace
from orchestrator.tune.spec import Sweep

TRIAL_RESULT_FILE = "trial_result.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the driver (travels with the trainable)."""

    sweep: Sweep
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    job_values: dict[str, Any] = field(default_factory=dict)  # from the placement (Workers.job_values)

    def trial_job(self, config: dict[str, Any]) -> JobConfig:
        """The base job with the trial's values, its own run folder and a child MLflow run."""
        sweep = self.sweep
        raw = sweep.job_raw({**self.job_values, **SearchSpace(sweep.config.space).job_params(config)})
        raw["name"] = config[RUN_NAME]
        raw["output_dir"] = storage.join(sweep.folder, "trials")
        tracking = raw.setdefault("tracking", {})
        tracking.update(tracking_uri=self.tracking_uri, experiment=self.experiment, parent_run_id=self.parent_run_id)
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
    stopping = setup.sweep.config.early_stopping
    # what ASHA compares must be in every result Tune gets (Tune's strict metric check)
    required = (SCORE, stopping.metric) if stopping.enabled else (SCORE,)
    summary = run_train_ray(job, callbacks=(_score_reports(job.train.steps, {"nfe": nfe}, required),))
    if summary.frechet_trained is None:
        raise JobError(f"trial {job.name} ended without a quality score; only grey-image datasets are scored during training")
    result = {
        SCORE: summary.frechet_trained,
        "score_samples": job.evaluation.num_samples,
        "nfe": nfe,
        "train_seconds": summary.seconds,
        "step": summary.steps,
        **checkpoint_scores.latest_score(job.run_dir),  # finished before run_train_ray returned
    }
    missing = [key for key in required if key not in result]
    if missing:
        raise JobError(f"trial {job.name} ended without {missing}: no checkpoint of it was scored (evaluation.every={job.evaluation.every})")
    _report_final(job, config, result)


def sampling_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function: the real evaluator (Ray Data) on the sweep's model file with the
    trial's sampler settings."""
    from orchestrator.sample.evaluate import run_evaluate

    job = setup.trial_job(config)
    summary = run_evaluate(job)
    (scored,) = summary.results
    result = {SCORE: scored.distance, "score_samples": summary.num_samples, "nfe": scored.nfe, "seconds": summary.seconds}
    _report_final(job, config, result)


def _score_reports(last_step: int, constants: dict[str, float], required: tuple[str, ...]):
    """Train V2's TuneReportCallback forwards every worker report to the Tune trial. Tune wants
    the searched metric (and ASHA's) in every result, so only the reports that carry them all
    go through (the quick score; with early_stopping.metric checkpoint_score, also the latest
    checkpoint score, from the first scored checkpoint on), with the trial's constant metrics
    added; the one at the last step is left out because the trial's final result (on more
    samples) stands for that step."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0]
            if any(key not in first for key in required) or first.get("step", 0) >= last_step:
                return
            super().after_report(run_context, [{**first, **constants}, *metrics[1:]], checkpoint)

    return ScoreReports()
