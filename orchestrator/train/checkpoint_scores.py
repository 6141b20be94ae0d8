"""Scores of checkpoints while training goes on (evaluation.every > 0).

    rank 0, once the checkpoint of step s is saved (s a multiple of evaluation.every), writes
        the EMA weights as a model file        <run_dir>/evaluations/step-<s>/model.pt
    a thread of the driver (the process running Ray Train's fit: the CLI's, or a Tune trial's)
        scores every such model file without scores.json on an actor pool of its own: evaluate's
        pipeline (orchestrator.sample.evaluate.score_model_file) at the sampler grid's settings,
        on evaluation.every_samples samples, with evaluation.num_actors x cpus_per_actor
        (gpus_per_actor); then logs the scores to the training's MLflow run at step s
        (checkpoint/<metric>/<setting>) and writes <run_dir>/evaluations/step-<s>/scores.json.

Training never waits for a score, except at its end, where the run's last scores are finished
before `train` returns. Each report of training carries the latest score (`checkpoint_score`,
the first setting's distance, and `checkpoint_score_step`), which a sweep's ASHA can read.

Why not Ray Train's ValidationConfig (Ray 2.60, alpha): it scores what Ray's checkpoint registry
holds and re-queues an unfinished validation from that registry's snapshot, which this project
removes before every fit (ray_backend.forget_ray_checkpoint_registry: after a torn checkpoint it
is wrong); it runs one plain task per checkpoint, not an actor pool; and its scores reach Ray's
checkpoint list, not the MLflow run. Here the folder is the record: a step with a model file and
no scores.json is pending, whichever run wrote it, so an evaluation cut off by a crash, a stop or
a lost driver is redone by the next run of the job.

Faults: a failed evaluation is tried again, evaluation.retries times (an actor killed mid-batch is
first restarted by Ray Data itself), and never stops training; a deterministic error (a JobError:
a wrong reference, say) is logged and not retried. A score reaches MLflow once per step: before
logging, the run's history of each metric is read, so a run killed between logging and writing
scores.json does not log it twice when it redoes it. Samples are a function of (seed, sample
index), so a redone score equals the first.

Cost: one model file (the EMA's weights) per scored step, kept with the run: the scores were
measured on them (train.keep_checkpoints does not prune them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable

from orchestrator import storage
from orchestrator.config import JobConfig, validate_job
from orchestrator.errors import JobError

logger = logging.getLogger(__name__)

EVALUATIONS = "evaluations"
MODEL_FILE = "model.pt"
SCORES = "scores.json"
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
POLL_SECONDS = 2.0


def enabled(config: JobConfig) -> bool:
    return config.evaluation.every > 0


def is_scored_step(config: JobConfig, step: int) -> bool:
    return enabled(config) and step % config.evaluation.every == 0


def step_folder(run_dir: str, step: int) -> str:
    return storage.join(run_dir, EVALUATIONS, f"step-{step:08d}")


def write_model_file(run_dir: str, step: int, data: bytes) -> None:
    """Rank 0: the model file the scoring thread will score (written whole, so never read half)."""
    storage.write_bytes(storage.join(step_folder(run_dir, step), MODEL_FILE), data)


def write_model_file_once(run_dir: str, step: int, data: Callable[[], bytes]) -> None:
    """Rank 0 on resume at a scored step: the model file, unless the run before wrote it."""
    if not _holds(run_dir, step, MODEL_FILE):
        write_model_file(run_dir, step, data())


def _holds(run_dir: str, step: int, name: str) -> bool:
    return storage.exists(storage.join(step_folder(run_dir, step), name))


def _steps(run_dir: str) -> list[int]:
    folder = storage.join(run_dir, EVALUATIONS)
    if not storage.exists(folder):
        return []
    return sorted(int(m.group(1)) for name in storage.list_names(folder) if (m := _STEP_FOLDER.match(name)))


def pending_steps(run_dir: str) -> list[int]:
    """Steps with a model file and no scores, oldest first."""
    return [step for step in _steps(run_dir) if _holds(run_dir, step, MODEL_FILE) and not _holds(run_dir, step, SCORES)]


def read_scores(run_dir: str, step: int) -> dict[str, Any] | None:
    path = storage.join(step_folder(run_dir, step), SCORES)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def scored_steps(run_dir: str) -> list[int]:
    return [step for step in _steps(run_dir) if _holds(run_dir, step, SCORES)]


def latest_score(run_dir: str) -> dict[str, float]:
    """What a training report carries: the newest checkpoint's score (its first setting's
    distance) and its step; empty before any."""
    for step in reversed(_steps(run_dir)):  # newest first: one or two reads per report, on S3 too
        scores = read_scores(run_dir, step)
        if scores is not None:
            return {"checkpoint_score": float(scores["results"][0]["distance"]), "checkpoint_score_step": step}
    return {}


def scoring_job(config: JobConfig, step: int) -> JobConfig:
    """The evaluate job of step `step`'s model file: the training job's evaluation section on
    evaluation.every_samples samples; precision/recall only where they fit in those."""
    raw = config.model_dump(mode="json")
    evaluation = raw["evaluation"]
    evaluation["model_file"] = storage.join(step_folder(config.run_dir, step), MODEL_FILE)
    raw["posthoc_ema"]["sigma_rel"] = None  # the checkpoint's own EMA
    evaluation["num_samples"] = config.evaluation.every_samples or config.evaluation.num_samples
    if evaluation["precision_recall_samples"] > evaluation["num_samples"]:
        evaluation["precision_recall_samples"] = 0
    return validate_job(raw)


def score_step(config: JobConfig, step: int) -> dict[str, Any]:
    """Score step `step`'s model file, log the scores to its MLflow run and write scores.json."""
    from orchestrator.sample.evaluate import score_model_file
    from orchestrator.tracking import log_metrics_once

    job = scoring_job(config, step)
    _inject_fault_for_tests(config.run_dir, step)
    scored = score_model_file(job)
    summary = scored.summary
    metrics: dict[str, float] = {}
    for result in summary.results:
        metrics[f"checkpoint/{summary.metric}/{result.setting}"] = result.distance
        if result.precision is not None:
            metrics[f"checkpoint/precision/{result.setting}"] = result.precision
            metrics[f"checkpoint/recall/{result.setting}"] = result.recall
        if result.inception_score is not None:
            metrics[f"checkpoint/inception_score/{result.setting}"] = result.inception_score[0]
    run_id = scored.model_metadata.get("mlflow_run_id")
    if config.tracking.enabled and run_id:
        log_metrics_once(config.tracking.tracking_uri, run_id, metrics, step)
    record = {
        "step": step,
        "metric": summary.metric,
        "extractor": summary.extractor,
        "reference": summary.reference,
        "num_samples": summary.num_samples,
        "seconds": summary.seconds,
        "results": [dataclasses.asdict(result) for result in summary.results],
        "fingerprint": summary.fingerprint,
    }
    storage.write_bytes(storage.join(step_folder(config.run_dir, step), SCORES), json.dumps(record, indent=2).encode())
    logger.info(
        "step %d scored: %s", step, ", ".join(f"{r.setting} {summary.metric} {r.distance:.4f}" for r in summary.results)
    )
    return record


class CheckpointScoring:
    """The driver's scoring thread (see the module docstring). `start()` before the fit;
    `finish()` after it returns (scores what is still pending, waiting for it); `stop()` when the
    run stopped or failed (what is pending waits for the next run)."""

    def __init__(self, config: JobConfig):
        self.config = config
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one evaluation at a time: the thread's, or finish()'s
        self.failures: dict[int, str] = {}  # step -> the last error, for steps given up on in this run

    def start(self) -> CheckpointScoring:
        if enabled(self.config):
            self._thread = threading.Thread(target=self._watch, name="checkpoint-scoring", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self.score_pending()
            except Exception:  # noqa: BLE001 - the thread must outlive any one listing error (S3 hiccup)
                logger.exception("checkpoint scoring: listing %s failed; trying again", self.config.run_dir)
            self._stopping.wait(POLL_SECONDS)

    def score_pending(self) -> None:
        with self._lock:
            for step in pending_steps(self.config.run_dir):
                if self._stopping.is_set():
                    return
                if step not in self.failures:
                    self._score_with_retries(step)

    def _score_with_retries(self, step: int) -> None:
        attempts = self.config.evaluation.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                score_step(self.config, step)
                return
            except JobError as error:  # deterministic: the same again on every attempt
                logger.error("checkpoint scoring: step %d cannot be scored: %s", step, error)
                self.failures[step] = str(error)
                return
            except Exception as error:  # noqa: BLE001 - a crashed actor, a lost node: try again
                logger.warning("checkpoint scoring: step %d failed (attempt %d of %d): %s", step, attempt, attempts, error)
                self.failures[step] = f"{type(error).__name__}: {error}"
        logger.error("checkpoint scoring: gave up on step %d after %d attempts; the next run of the job scores it", step, attempts)

    def stop(self) -> None:
        self._stopping.set()

    def finish(self) -> dict[int, str]:
        """Stop watching, then score what is pending; returns the steps that failed."""
        if self._thread is None:
            return {}
        self._stopping.set()
        self._thread.join()
        self._stopping.clear()
        self.failures.clear()  # the last chance in this run: give each pending step its attempts
        self.score_pending()
        self._stopping.set()
        return dict(self.failures)


def _inject_fault_for_tests(run_dir: str, step: int) -> None:
    """Test hook: UCGM_SCORE_FAULT=<step>:<action> with UCGM_SCORE_FAULT_MARKER=<file> makes the
    evaluation of that step, once, `raise` an error or `hang` (for a test that kills the driver
    mid-evaluation); the marker file records that it did. The actor-kill fault lives in
    SampleStatistics (UCGM_ACTOR_FAULT_ARM)."""
    fault, marker = os.environ.get("UCGM_SCORE_FAULT"), os.environ.get("UCGM_SCORE_FAULT_MARKER")
    if not fault or not marker:
        return
    at, _, action = fault.partition(":")
    if int(at) != step or os.path.exists(marker):
        return
    with open(marker, "w") as handle:
        handle.write(f"{step} {action}\n")
    if action == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected evaluation fault at step {step} (UCGM_SCORE_FAULT)")
