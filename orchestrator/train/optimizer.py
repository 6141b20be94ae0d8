"""The optimiser of a training run and its learning-rate schedule, shared by both backends (the
DeepSpeed engine is handed the same torch optimiser)."""

from __future__ import annotations

import torch

from orchestrator.config import JobConfig


def warmup_schedule(warmup_steps: int):
    """Linear learning-rate warm-up over `warmup_steps` optimiser steps, then constant."""
    warmup = max(warmup_steps, 1)
    return lambda step: min(1.0, (step + 1) / warmup)


def build_optimizer(parameters, config: JobConfig) -> torch.optim.Optimizer:
    train = config.train
    optimizer_class = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[train.optimizer]
    return optimizer_class(parameters, lr=train.learning_rate, betas=train.betas, weight_decay=train.weight_decay)
