"""The training loop, shared by the single-process backend and every Ray Train worker.

What differs between backends sits behind two small interfaces:

- an `Optimization` does the backward pass and the optimiser step (plain torch, or a DeepSpeed
  engine that owns ZeRO sharding, accumulation, clipping and mixed precision);
- a `Checkpointer` saves and restores the training state (a run folder, or Ray Train's
  checkpoint storage) and forwards interval metrics to the backend.

Everything random in a step is a function of (seed, step, chunk) and the data of a step a
function of (seed, step), where a chunk is one micro-batch of the global batch: chunk
c = micro_step * world_size + rank of world_size * accumulation_steps chunks. A run on W workers
with A accumulation steps therefore computes the same gradients as one process with W * A
accumulation steps, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from orchestrator import storage
from orchestrator.errors import ConfigError
from orchestrator.train import checkpoint_scores, posthoc, pretrained
from orchestrator.train.batches import step_generator
from orchestrator.train.inputs import TrainingInput, open_training_input
from orchestrator.stopping import NoStop, StopCheck
from orchestrator.config import JobConfig
from orchestrator.image_grid import grid_png
from orchestrator.tracking import NullTracker, Tracker, open_tracker
from orchestrator.summary import VerbSummary
from ucgm_core.dit import DiT, build_dit
from ucgm_core.ema import ModelEMA, TargetNetwork
from ucgm_core.posthoc_ema import PowerFunctionEMA
from ucgm_core.evaluation import balanced_labels, generate, sample_statistics
from ucgm_core.features import DigitClassifierFeatures
from ucgm_core.fid import FeatureStatistics, frechet_distance_from_statistics
from ucgm_core.model_file import model_file_bytes
from ucgm_core.systems import build_objective
from ucgm_core.transports import build_transport

logger = logging.getLogger(__name__)


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class TrainingRun:
    """What one rank trains with: data, network, EMA, target network, objective.

    The EMA and the target network are full copies taken before any engine shards the network,
    so they stay plain modules under every ZeRO stage."""

    def __init__(self, config: JobConfig, *, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.autocast_dtype = resolve_precision(config.train.precision, device)
        torch.manual_seed(config.seed)  # the same initial weights on every rank

        self.input: TrainingInput = open_training_input(config, rank=rank, world_size=world_size)
        self.num_classes = self.input.num_classes
        channels, size, _ = self.input.image_shape
        shape = {"input_size": size, "in_channels": channels, "num_classes": self.num_classes}
        self.model: DiT = build_dit(config.model, **shape)
        if config.train.initialize_from:
            # before the EMA and the target network copy the weights: a frozen theta- is this start
            pretrained.initialize_weights(self.model, config, **shape)
        self.model.to(device)
        if config.objective.needs_forward_mode_autodiff:
            self.model.set_attention("math")  # forward-mode AD does not pass fused attention kernels
        self.ema = ModelEMA(self.model, decay=config.train.ema_decay, warmup=True)
        # post-hoc EMA: power-function averages whose snapshots `ema` recombines after training
        self.power_emas = [PowerFunctionEMA(self.model, sigma_rel) for sigma_rel in config.train.posthoc_ema_sigma_rels]
        self.transport = build_transport(config.transport)
        teacher = pretrained.load_teacher(config, device, **shape) if config.train.teacher else None
        self.objective = build_objective(config.objective, self.transport, teacher=teacher)
        # parameters the objective trains besides the network's (sCM's learned loss weight)
        self.extra_modules = torch.nn.ModuleList(self.objective.extra_modules()).to(device)
        self.trained = TrainedModules(self.model, self.extra_modules)
        # theta- costs a model copy; multi-step training without an enhanced target never reads it
        self.target: TargetNetwork | None = (
            self.objective.create_target_network(self.model) if self.objective.needs_target_network else None
        )
        self.accumulation_steps = config.train.gradient_accumulation_steps
        self.step = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.input.image_shape)  # type: ignore[return-value]

    @property
    def num_chunks(self) -> int:
        return self.world_size * self.accumulation_steps

    def chunk(self, micro_step: int) -> int:
        return micro_step * self.world_size + self.rank

    def loss(self, network: Callable, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on this rank's micro-batch `micro_step` of step `step` (forward only).
        `network` is the module to train through (the DeepSpeed engine under DeepSpeed)."""
        chunk = self.chunk(micro_step)
        images, labels = self.input.batch(step, chunk, self.num_chunks)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        generator = step_generator(self.config.seed, step, chunk, self.device)
        target = self.target.module(self.model) if self.target is not None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            output = self.objective(
                network, target, images, labels, generator=generator, num_classes=self.num_classes, step=step
            )
        return output.loss, output.metrics

    def update_averages(self) -> None:
        self.ema.update(self.model)
        if self.target is not None:
            self.target.update(self.model)
        for average in self.power_emas:
            average.update(self.model)

    def averages_state(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "target": self.target.state_dict() if self.target is not None else None,
            "power_emas": [average.state_dict() for average in self.power_emas],
        }

    def load_averages_state(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        saved = state.get("power_emas") or []
        if self.power_emas and len(saved) != len(self.power_emas):
            raise ConfigError.of_job([
                "train.posthoc_ema_sigma_rels: the checkpoint tracked "
                f"{[s['sigma_rel'] for s in saved] or 'no power-function EMAs'}, this job {list(self.config.train.posthoc_ema_sigma_rels)}; "
                "a post-hoc EMA must be tracked from the first step: resume with the same list, or start a new run (another name)"
            ])
        for average, average_state in zip(self.power_emas, saved):
            average.load_state_dict(average_state)

    def model_file(self, metadata: dict[str, Any]) -> bytes:
        channels, size, _ = self.image_shape
        return model_file_bytes(
            self.ema.module,
            settings=self.config.model,
            input_size=size,
            in_channels=channels,
            num_classes=self.num_classes,
            transport=self.config.transport,
            sampler=self.config.sampler,
            metadata=metadata,
        )


class TrainedModules(torch.nn.Module):
    """Everything the optimiser updates: the network, plus the objective's extra modules. It is
    what an engine wraps (so ZeRO shards and reduces the extras too); calling it calls the network."""

    def __init__(self, network: DiT, extras: torch.nn.ModuleList):
        super().__init__()
        self.network, self.extras = network, extras

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(*args, **kwargs)


class Optimization(Protocol):
    network: Callable  # what the loss is computed through

    def micro_step(self, loss: torch.Tensor) -> None: ...
    def finish_step(self) -> float: ...  # returns the gradient norm before clipping
    def learning_rate(self) -> float: ...
    def gathered_parameters(self) -> AbstractContextManager: ...  # full weights readable inside
    def mean_over_ranks(self, value: float) -> float: ...


class Checkpointer(Protocol):
    choose_seconds: float  # spent choosing (and checking) the checkpoint before the engine was built
    def restore(self, run: TrainingRun, optimization: Optimization) -> dict[str, Any] | None: ...
    def save(self, run: TrainingRun, optimization: Optimization, extra: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def report(self, metrics: dict[str, float]) -> None: ...


class QualityScorer:
    """Frechet distance of samples to the training data in a fixed classifier's feature space."""

    def __init__(self, run: TrainingRun):
        self.run = run
        # sklearn's 8x8 digits fill their frame; MNIST digits sit in a 20x20 box (README, "Scores")
        framing = "mnist_box" if run.image_shape[-1] < 20 else "stretch"
        self.extractor = DigitClassifierFeatures(framing=framing, device=run.device)
        self.reference = FeatureStatistics.empty(self.extractor.feature_dim)
        for images in run.input.reference_batches(run.config.evaluation.batch_size):
            self.reference = self.reference.merge(FeatureStatistics.from_features(self.extractor(images.to(run.device))))

    def score(self, network: torch.nn.Module, num_samples: int | None = None) -> float:
        """On `num_samples` samples (default evaluation.num_samples)."""
        evaluation, run = self.run.config.evaluation, self.run
        statistics = sample_statistics(
            network,
            run.transport,
            run.config.sampler,
            self.extractor,
            num_samples=num_samples or evaluation.num_samples,
            num_classes=run.num_classes,
            image_shape=run.image_shape,
            batch_size=evaluation.batch_size,
            seed=run.config.seed,
            device=run.device,
        )
        return frechet_distance_from_statistics(statistics, self.reference)


@dataclass
class TrainSummary(VerbSummary):
    run_dir: str
    steps: int
    resumed_from: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    frechet_untrained: float | None
    frechet_trained: float | None
    extractor: str | None
    mlflow_run_id: str | None
    # what checkpoints cost this run, as the training loop waited for them: the restore, and the
    # saves (sync upload: until persisted; async: until on the worker's disk)
    restore_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    checkpoints: int = 0

    @classmethod
    def from_json(cls, text: str) -> TrainSummary:
        return cls(**json.loads(text))


class IntervalLog:
    """Averages over each logging interval; one readable line per interval; metrics.jsonl."""

    def __init__(self, run: TrainingRun, optimization: Optimization, tracker: Tracker, resumed_from: int):
        self.run, self.optimization, self.tracker = run, optimization, tracker
        path = storage.join(run.config.run_dir, "metrics.jsonl")
        previous = storage.read_bytes(path).decode().splitlines() if resumed_from and storage.exists(path) else []
        # records logged after the newest checkpoint are replayed by this run, so drop them
        self.history = [r for r in map(json.loads, filter(None, previous)) if r["step"] <= resumed_from]
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps, self.started = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.loss_sum += loss
        self.steps += 1

    def flush(self, grad_norm: float) -> dict[str, float]:
        """Close the interval (a collective under several workers: every rank calls it)."""
        train = self.run.config.train
        elapsed = time.perf_counter() - self.started
        record = {
            "step": self.run.step,
            "loss": self.optimization.mean_over_ranks(self.loss_sum / max(self.steps, 1)),
            "grad_norm": grad_norm,
            "learning_rate": self.optimization.learning_rate(),
            "images_per_second": self.steps * train.batch_size / max(elapsed, 1e-9),
            # the share of the interval this rank waited for its examples (streamed shards not yet read)
            "data_stall_share": self.optimization.mean_over_ranks(self.run.input.take_wait_seconds() / max(elapsed, 1e-9)),
        }
        self.last_loss = record["loss"]
        if self.run.rank == 0:
            self.history.append(record)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=self.run.step)
            eta = (train.steps - self.run.step) * elapsed / max(self.steps, 1)
            logger.info(
                "step %d/%d  loss %.4f  %.0f img/s  eta %s",
                self.run.step, train.steps, record["loss"], record["images_per_second"], _format_seconds(eta),
            )
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            storage.write_bytes(storage.join(self.run.config.run_dir, "metrics.jsonl"), lines.encode())
        self._reset()
        return record


def write_sample_grid(run: TrainingRun, tracker: Tracker, name: str) -> None:
    evaluation = run.config.evaluation
    count = evaluation.grid_size**2
    labels = balanced_labels(count, run.num_classes)
    images = generate(run.ema.module, run.transport, run.config.sampler, list(range(count)), labels, run.image_shape, run.device)
    png = grid_png(images, columns=evaluation.grid_size)
    storage.write_bytes(storage.join(run.config.run_dir, "samples", f"{name}.png"), png)
    tracker.log_artifact_bytes(png, f"samples/{name}.png")


TrackerFactory = Callable[[str | None], Tracker]


def tracker_factory(config: JobConfig) -> TrackerFactory:
    """Opens the job's MLflow run, or continues the run `run_id` of a resumed job."""
    tracking = config.tracking
    experiment = tracking.experiment or config.name
    return lambda run_id: open_tracker(
        tracking.enabled, tracking.tracking_uri, experiment, run_id=run_id, run_name=config.name, parent_run_id=tracking.parent_run_id
    )


def train_loop(
    run: TrainingRun, optimization: Optimization, checkpointer: Checkpointer, open_tracker: TrackerFactory, stop: StopCheck | None = None
) -> TrainSummary | None:
    """Resume if a checkpoint exists, train to `train.steps`, then (rank 0) write the final grid,
    the quality score, the consolidated model file and summary.json.

    When `stop` asks for it (a signal to the driver; orchestrator.stopping), the run writes
    a checkpoint at the step it is at, closes the logging interval there and returns None; when
    it reports a node being preempted, it writes a checkpoint and goes on."""
    stop = stop or NoStop()
    started = time.perf_counter()
    config, train, is_main = run.config, run.config.train, run.rank == 0
    restored = checkpointer.restore(run, optimization)
    restore_seconds = checkpointer.choose_seconds + time.perf_counter() - started
    resumed_from = run.step
    if resumed_from:
        logger.info("resuming %s from step %d (restored in %.2f s)", config.run_dir, resumed_from, restore_seconds)
    checkpoint_seconds, checkpoints = 0.0, 0

    tracker: Tracker = NullTracker()
    scorer = frechet_untrained = None

    def scored_model_file(step: int) -> bytes:  # what the scoring thread scores, and logs to this MLflow run
        return run.model_file({"step": step, "job": config.name, "mlflow_run_id": tracker.run_id})

    if is_main:
        tracker = open_tracker((restored or {}).get("mlflow_run_id"))
        tracker.log_params(config.to_flat_dict())
        if resumed_from:
            tracker.log_metrics({"restore_seconds": restore_seconds}, step=resumed_from)
        tracker.set_tags({"run_dir": config.run_dir, "model_parameters": str(sum(p.numel() for p in run.ema.module.parameters()))})
        if resumed_from and checkpoint_scores.is_scored_step(config, resumed_from):
            # a crash between the checkpoint's commit and its model file: write it now, so it is scored
            checkpoint_scores.write_model_file_once(config.run_dir, resumed_from, lambda: scored_model_file(resumed_from))
        scorer = QualityScorer(run) if run.image_shape[0] == 1 else None
        if scorer is None:
            logger.warning("no feature extractor for %d-channel images yet; skipping the quality score", run.image_shape[0])
        elif run.step == 0:
            frechet_untrained = scorer.score(run.ema.module)
            tracker.log_metrics({"frechet_distance": frechet_untrained}, step=0)
            logger.info("untrained model: Frechet distance %.3f (%s)", frechet_untrained, scorer.extractor.identifier())

    interval = IntervalLog(run, optimization, tracker, resumed_from)
    try:
        while run.step < train.steps:
            run.model.train()
            step_loss = 0.0
            for micro_step in range(run.accumulation_steps):
                loss, _ = run.loss(optimization.network, run.step, micro_step)
                optimization.micro_step(loss)
                step_loss += float(loss.detach()) / run.accumulation_steps
            interval.add(step_loss)
            grad_norm = optimization.finish_step()
            with optimization.gathered_parameters():
                run.update_averages()
            run.step += 1
            _inject_fault_for_tests(run)

            # the same answer on every rank (a collective); the last step ends the run anyway
            stopping = stop.should_stop(run.step) and run.step < train.steps
            preempted = stop.preempted()
            # a stop closes the interval where it is, so each step's loss is in exactly one record
            logged = stopping or run.step % train.log_every == 0 or run.step == train.steps
            metrics = interval.flush(grad_norm) if logged else None
            if train.score_every and run.step % train.score_every == 0:
                # every rank reports on this step (reports are collective); rank 0's carries the score
                metrics = {**(metrics or {"step": run.step}), **quick_score(run, scorer, tracker, started)}
            if is_main and run.step % train.sample_every == 0:
                write_sample_grid(run, tracker, f"step_{run.step:08d}")
            if is_main and run.power_emas and run.step % train.posthoc_ema_every == 0:
                posthoc.write_snapshots(run.config, run.power_emas, run.step)
            if is_main and metrics is not None and checkpoint_scores.enabled(config):
                metrics = {**metrics, **checkpoint_scores.latest_score(config.run_dir)}  # what ASHA may read
            if stopping or preempted or run.step % train.checkpoint_every == 0 or run.step == train.steps:
                saving = time.perf_counter()
                checkpointer.save(run, optimization, {"mlflow_run_id": tracker.run_id}, metrics or {"step": run.step})
                saved_in = time.perf_counter() - saving
                checkpoint_seconds, checkpoints = checkpoint_seconds + saved_in, checkpoints + 1
                tracker.log_metrics({"checkpoint_seconds": saved_in}, step=run.step)
                if is_main and checkpoint_scores.is_scored_step(config, run.step):
                    # after the save: a step whose checkpoint was not committed is trained, and written, again
                    checkpoint_scores.write_model_file(config.run_dir, run.step, scored_model_file(run.step))
            elif metrics is not None:
                checkpointer.report(metrics)
            if stopping:
                if is_main:
                    logger.warning("stopped at step %d/%d with a checkpoint; run the same job again to resume", run.step, train.steps)
                stop.stopped(run.step)
                tracker.finish("KILLED")
                return None
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        run.input.close()

    summary = None
    if is_main:
        run.ema.module.eval()
        write_sample_grid(run, tracker, "final")
        frechet_trained = scorer.score(run.ema.module) if scorer is not None else None
        if frechet_trained is not None:
            tracker.log_metrics({"frechet_distance": frechet_trained}, step=run.step)
            tracker.set_tags({"feature_extractor": scorer.extractor.identifier()})
        storage.write_bytes(storage.join(config.run_dir, "model.pt"), run.model_file({"step": run.step, "job": config.name}))
        summary = TrainSummary(
            run_dir=config.run_dir,
            steps=run.step,
            resumed_from=resumed_from,
            seconds=round(time.perf_counter() - started, 2),
            first_loss=interval.first_loss,
            last_loss=interval.last_loss,
            frechet_untrained=frechet_untrained,
            frechet_trained=frechet_trained,
            extractor=scorer.extractor.identifier() if scorer else None,
            mlflow_run_id=tracker.run_id,
            restore_seconds=round(restore_seconds, 3),
            checkpoint_seconds=round(checkpoint_seconds, 3),
            checkpoints=checkpoints,
        )
        storage.write_bytes(storage.join(config.run_dir, "summary.json"), summary.to_json().encode())
        tracker.log_artifact_bytes(summary.to_json().encode(), "summary.json")
        tracker.finish()
    return summary


def quick_score(run: TrainingRun, scorer: QualityScorer | None, tracker: Tracker, started: float) -> dict[str, float]:
    """The cheap score on evaluation.score_samples samples that early stopping (a sweep's ASHA)
    reads from the reports; empty on ranks other than 0."""
    if scorer is None:
        return {}
    samples = run.config.evaluation.score_samples
    distance = scorer.score(run.ema.module, num_samples=samples)
    tracker.log_metrics({"frechet_distance_quick": distance}, step=run.step)
    logger.info("step %d: Frechet distance %.3f on %d samples", run.step, distance, samples)
    return {"frechet_distance": distance, "score_samples": samples, "train_seconds": time.perf_counter() - started}


def _inject_fault_for_tests(run: TrainingRun) -> None:
    """Test hook, for worker restarts: with UCGM_FAULT_AT_STEP=k[,k2,...] and
    UCGM_FAULT_MARKER=<file>, after each listed step one rank fails, once (the marker file lists
    the faults done, one "<step> rank <rank>" line each). The failing rank is the last one, or the
    one UCGM_FAULT_RANKS=r[,r2,...] gives for that step; it raises, or with UCGM_FAULT_SIGNAL=KILL
    SIGKILLs itself (no exception, no cleanup: what the OOM killer or a lost node does)."""
    at_steps, marker = os.environ.get("UCGM_FAULT_AT_STEP"), os.environ.get("UCGM_FAULT_MARKER")
    if at_steps is None or marker is None:
        return
    steps = [int(step) for step in at_steps.split(",")]
    if run.step not in steps:
        return
    ranks = os.environ.get("UCGM_FAULT_RANKS")
    rank = int(ranks.split(",")[steps.index(run.step)]) if ranks else run.world_size - 1
    if run.rank != rank:
        return
    if os.path.exists(marker):
        with open(marker) as handle:
            if any(line.split()[:1] == [str(run.step)] for line in handle):
                return
    with open(marker, "a") as handle:
        handle.write(f"{run.step} rank {run.rank}\n")
    if os.environ.get("UCGM_FAULT_SIGNAL", "").upper() == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault after step {run.step} (UCGM_FAULT_AT_STEP)")


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
