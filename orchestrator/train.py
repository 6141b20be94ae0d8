"""The `train` verb in one process: UCGM-T on a dataset, with checkpoints, resume, sample grids,
MLflow tracking and a closing sample-quality score.

`TrainingRun` holds what one rank needs (data, network, EMA, target network, objective,
optimiser) and `train_step` is one optimisation step on that rank's shard of the global batch;
`run_train` is the single-process loop around them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator import checkpoints, storage
from orchestrator.batches import BatchSchedule, step_generator
from orchestrator.config import JobConfig
from orchestrator.images import grid_png
from orchestrator.tracking import Tracker, open_tracker
from ucgm_core.datasets import ImageDataset, load_dataset
from ucgm_core.dit import DiT, build_dit
from ucgm_core.ema import ModelEMA, TargetNetwork
from ucgm_core.evaluation import balanced_labels, dataset_statistics, generate, sample_statistics
from ucgm_core.features import DigitClassifierFeatures
from ucgm_core.fid import frechet_distance_from_statistics
from ucgm_core.model_file import model_file_bytes
from ucgm_core.objective import UnifiedObjective
from ucgm_core.transports import build_transport

logger = logging.getLogger(__name__)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class TrainingRun:
    """Everything one rank trains with. Randomness of a step is a function of (seed, step, rank)
    and the data of a step a function of (seed, step), so the state to save is the weights, the
    optimiser and the step."""

    def __init__(self, config: JobConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(config.train.device)
        self.autocast_dtype = resolve_precision(config.train.precision, self.device)
        torch.manual_seed(config.seed)  # parameter initialisation is the same on every rank

        self.dataset: ImageDataset = load_dataset(
            config.data.name, path=config.data.path, image_size=config.data.image_size, limit=config.data.limit
        )
        channels, size, _ = self.dataset.image_shape
        self.model: DiT = build_dit(config.model, input_size=size, in_channels=channels, num_classes=self.dataset.num_classes)
        self.model.to(self.device)
        if config.objective.derivative == "jvp":
            self.model.set_attention("math")  # forward-mode AD does not pass fused attention kernels
        self.ema = ModelEMA(self.model, decay=config.train.ema_decay, warmup=True)
        self.transport = build_transport(config.transport)
        self.objective = UnifiedObjective(self.transport, config.objective)
        # theta- costs a model copy; plain multi-step training without an enhanced target never reads it
        self.target: TargetNetwork | None = (
            self.objective.create_target_network(self.model) if self.objective.needs_target_network else None
        )
        self.schedule = BatchSchedule(len(self.dataset), config.train.batch_size, config.seed)
        self.step = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.dataset.image_shape)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.schedule.shard_indices(step, self.rank, self.world_size)
        return self.dataset.images[indices].to(self.device), self.dataset.labels[indices].to(self.device)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on this rank's shard of step `step` (forward only)."""
        images, labels = self.batch(step)
        generator = step_generator(self.config.seed, step, self.rank, self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            target = self.target.module(self.model) if self.target is not None else None
            output = self.objective(self.model, target, images, labels, generator=generator)
        return output.loss, output.metrics

    def after_optimizer_step(self) -> None:
        self.ema.update(self.model)
        if self.target is not None:
            self.target.update(self.model)
        self.step += 1

    def model_file(self, metadata: dict[str, Any]) -> bytes:
        channels, size, _ = self.image_shape
        return model_file_bytes(
            self.ema.module,
            settings=self.config.model,
            input_size=size,
            in_channels=channels,
            num_classes=self.dataset.num_classes,
            transport=self.config.transport,
            sampler=self.config.sampler,
            metadata=metadata,
        )


def build_optimizer(run: TrainingRun) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    train = run.config.train
    optimizer_class = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[train.optimizer]
    optimizer = optimizer_class(run.model.parameters(), lr=train.learning_rate, betas=train.betas, weight_decay=train.weight_decay)
    warmup = max(train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


@dataclass
class TrainSummary:
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _check_compatible(state: dict[str, Any], config: JobConfig, folder: str) -> None:
    saved = state.get("config", {})
    for section in ("model", "data", "transport"):
        if saved.get(section) != config.model_dump(mode="json")[section]:
            raise checkpoints.CheckpointError(
                f"checkpoint {folder} was written by a job with a different {section!r} section "
                f"({saved.get(section)!r}); this job has {config.model_dump(mode='json')[section]!r}. "
                "Nothing was changed: pick another name= or output_dir= for a new run, or restore the old settings to resume."
            )


class QualityScorer:
    """Frechet distance of EMA samples to the training data in a fixed classifier's feature space."""

    def __init__(self, run: TrainingRun):
        config = run.config.evaluation
        self.run = run
        # sklearn's 8x8 digits fill their frame; MNIST digits sit in a 20x20 box (README, "Scores")
        framing = "mnist_box" if run.image_shape[-1] < 20 else "stretch"
        self.extractor = DigitClassifierFeatures(framing=framing, device=run.device)
        self.reference = dataset_statistics(run.dataset.images.to(run.device), self.extractor, config.batch_size)

    def score(self, network: torch.nn.Module) -> float:
        config, run = self.run.config.evaluation, self.run
        statistics = sample_statistics(
            network,
            run.transport,
            run.config.sampler,
            self.extractor,
            num_samples=config.num_samples,
            num_classes=run.dataset.num_classes,
            image_shape=run.image_shape,
            batch_size=config.batch_size,
            seed=run.config.seed,
            device=run.device,
        )
        return frechet_distance_from_statistics(statistics, self.reference)


def _scorer_or_none(run: TrainingRun) -> QualityScorer | None:
    if run.image_shape[0] != 1:
        logger.warning("no feature extractor for %d-channel images yet; skipping the quality score", run.image_shape[0])
        return None
    return QualityScorer(run)


def _write_sample_grid(run: TrainingRun, tracker: Tracker, name: str) -> None:
    evaluation = run.config.evaluation
    count = evaluation.grid_size**2
    labels = balanced_labels(count, run.dataset.num_classes)
    images = generate(run.ema.module, run.transport, run.config.sampler, list(range(count)), labels, run.image_shape, run.device)
    png = grid_png(images, columns=evaluation.grid_size)
    storage.write_bytes(storage.join(run.config.run_dir, "samples", f"{name}.png"), png)
    tracker.log_artifact_bytes(png, f"samples/{name}.png")


def run_train(config: JobConfig) -> TrainSummary:
    """Train in this process, resuming from the newest checkpoint of the run folder if there is one."""
    started = time.perf_counter()
    run_dir = config.run_dir
    storage.makedirs(run_dir)  # fails early on an unreachable storage path
    run = TrainingRun(config)
    optimizer, scheduler = build_optimizer(run)

    state = None
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is not None:
        state = checkpoints.load_checkpoint(latest)
        _check_compatible(state, config, latest)
        run.model.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        if run.target is not None:
            run.target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.step = state["step"]
        logger.info("resuming %s from step %d", run_dir, run.step)
    resumed_from = run.step

    tracker = open_tracker(
        config.tracking.enabled,
        config.tracking.tracking_uri,
        config.tracking.experiment or config.name,
        run_id=state.get("mlflow_run_id") if state else None,
        run_name=config.name,
    )
    tracker.log_params(config.to_flat_dict())
    tracker.set_tags({"run_dir": run_dir, "model_parameters": str(sum(p.numel() for p in run.model.parameters()))})

    scorer = _scorer_or_none(run)
    frechet_untrained = None
    if scorer is not None and run.step == 0:
        frechet_untrained = scorer.score(run.ema.module)
        tracker.log_metrics({"frechet_distance": frechet_untrained}, step=0)
        logger.info("untrained model: Frechet distance %.3f (%s)", frechet_untrained, scorer.extractor.identifier())

    # records logged after the newest checkpoint are replayed by this run, so drop them
    history = [r for r in _read_history(run_dir) if r["step"] <= resumed_from] if resumed_from else []
    train = config.train
    first_loss = last_loss = None
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    try:
        while run.step < train.steps:
            run.model.train()
            loss, metrics = run.loss(run.step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), train.gradient_clip or math.inf)
            optimizer.step()
            scheduler.step()
            run.after_optimizer_step()

            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            window_loss, window_steps = window_loss + value, window_steps + 1
            if run.step % train.log_every == 0 or run.step == train.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": run.step,
                    "loss": window_loss / window_steps,
                    "grad_norm": float(grad_norm),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "images_per_second": window_steps * train.batch_size / max(elapsed, 1e-9),
                }
                last_loss = record["loss"]
                history.append(record)
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=run.step)
                eta = (train.steps - run.step) * elapsed / window_steps
                logger.info(
                    "step %d/%d  loss %.4f  %.0f img/s  eta %s",
                    run.step, train.steps, record["loss"], record["images_per_second"], _format_seconds(eta),
                )
                storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history).encode())
                window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
            if run.step % train.sample_every == 0:
                _write_sample_grid(run, tracker, f"step_{run.step:08d}")
            if run.step % train.checkpoint_every == 0 or run.step == train.steps:
                checkpoints.save_checkpoint(
                    run_dir,
                    run.step,
                    {
                        "step": run.step,
                        "model": run.model.state_dict(),
                        "ema": run.ema.state_dict(),
                        "target": run.target.state_dict() if run.target is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "mlflow_run_id": tracker.run_id,
                        "config": config.model_dump(mode="json"),
                    },
                    keep=train.keep_checkpoints,
                )
    except BaseException:
        tracker.finish("FAILED")
        raise

    run.ema.module.eval()
    _write_sample_grid(run, tracker, "final")
    frechet_trained = scorer.score(run.ema.module) if scorer is not None else None
    if frechet_trained is not None:
        tracker.log_metrics({"frechet_distance": frechet_trained}, step=run.step)
        tracker.set_tags({"feature_extractor": scorer.extractor.identifier()})
    storage.write_bytes(storage.join(run_dir, "model.pt"), run.model_file({"step": run.step, "job": config.name}))
    summary = TrainSummary(
        run_dir=run_dir,
        steps=run.step,
        resumed_from=resumed_from,
        seconds=round(time.perf_counter() - started, 2),
        first_loss=first_loss,
        last_loss=last_loss,
        frechet_untrained=frechet_untrained,
        frechet_trained=frechet_trained,
        extractor=scorer.extractor.identifier() if scorer else None,
        mlflow_run_id=tracker.run_id,
    )
    storage.write_bytes(storage.join(run_dir, "summary.json"), summary.to_json().encode())
    tracker.log_artifact_bytes(summary.to_json().encode(), "summary.json")
    tracker.finish()
    return summary


def _read_history(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
