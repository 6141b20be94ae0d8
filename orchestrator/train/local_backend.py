"""The single-process training backend: a plain torch optimiser and checkpoints in the run folder.

It is the reference the Ray/DeepSpeed backend is checked against, and a way to train with no
Ray at all (`distributed.backend=local`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from orchestrator.train import checkpoints
from orchestrator.errors import ResourceError
from orchestrator.config import JobConfig
from orchestrator.train.loop import TrainingRun, TrainSummary, tracker_factory, train_loop
from orchestrator.train.optimizer import build_optimizer, warmup_schedule
from orchestrator.stopping import LocalStop, StopRequest, Stopped, signals_stop


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ResourceError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class TorchOptimization:
    """Gradient accumulation, clipping and the optimiser step with plain torch."""

    def __init__(self, run: TrainingRun):
        self.network = run.model
        self.accumulation_steps = run.accumulation_steps
        self.gradient_clip = run.config.train.gradient_clip
        self.parameters = list(run.trained.parameters())  # the network's and the objective's extras
        self.optimizer = build_optimizer(self.parameters, run.config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(run.config.train.warmup_steps))

    def micro_step(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def finish_step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.gradient_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def mean_over_ranks(self, value: float) -> float:
        return value


class RunFolderCheckpointer:
    """Checkpoints as `<run_dir>/checkpoints/checkpoint_XXXXXXXX/{state.pt, manifest-rank00000.json}`
    (see orchestrator.train.checkpoints)."""

    choose_seconds = 0.0  # restore() chooses the checkpoint too

    def __init__(self, config: JobConfig):
        self.config = config

    def restore(self, run: TrainingRun, optimization: TorchOptimization) -> dict[str, Any] | None:
        found = checkpoints.resumable_checkpoint(
            checkpoints.checkpoint_root(self.config.run_dir), self.config, checkpoints.STATE_FILE, check_content=True
        )
        if found is None:
            return None
        _, state = found
        run.trained.load_state_dict(state["model"])
        run.load_averages_state(state)
        optimization.optimizer.load_state_dict(state["optimizer"])
        optimization.scheduler.load_state_dict(state["scheduler"])
        run.step = state["step"]
        return state

    def save(self, run: TrainingRun, optimization: TorchOptimization, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        state = {
            "step": run.step,
            "model": run.trained.state_dict(),
            **run.averages_state(),
            "optimizer": optimization.optimizer.state_dict(),
            "scheduler": optimization.scheduler.state_dict(),
            "config": self.config.model_dump(mode="json"),
            **extra,
        }
        checkpoints.save_checkpoint(
            self.config.run_dir, run.step, state, keep=self.config.train.keep_checkpoints, num_chunks=run.num_chunks
        )

    def report(self, metrics: dict[str, float]) -> None:
        pass


def run_train_local(config: JobConfig) -> TrainSummary:
    """Train in this process, resuming from the newest checkpoint of the run folder if there is
    one. SIGTERM or Ctrl-C stops it with a checkpoint at the current step (`Stopped`)."""
    request = StopRequest()
    with signals_stop(request):
        run = TrainingRun(config, device=resolve_device(config.train.device))
        summary = train_loop(run, TorchOptimization(run), RunFolderCheckpointer(config), tracker_factory(config), LocalStop(request))
    if summary is None:
        raise Stopped(request.signal_name or "a stop request", run.step, request.exit_code)
    return summary
