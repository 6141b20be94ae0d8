"""Post-hoc EMA in a run folder: the snapshots training writes, and the `ema` verb that turns
them into a model file for any EMA length (the math: ucgm_core.posthoc_ema).

    <run_dir>/ema_snapshots/sigma_rel-0.050/step-00000500.pt     {"sigma_rel", "gamma", "step", "weights"}

Each snapshot is one float32 copy of the network (DiT-XL/2: 2.7 GB; the digits DiT: 5 MB), so a
run of S steps tracking two EMAs every N steps stores 2 S / N of them; train.keep_ema_snapshots
keeps only the newest per EMA (EDM2 snapshots every 8M images and keeps them all).

    python -m orchestrator ema jobs/digits.yaml sigma_rel=0.08     # -> <run_dir>/model-sigma_rel-0.080.pt

The snapshots are read from posthoc_ema.run_dir (default: the job's run folder). A sampling-only
sweep may search posthoc_ema.sigma_rel: it points run_dir at its model file's folder, and each
trial's evaluate reconstructs its length there before it samples: an evaluate job with
posthoc_ema.sigma_rel scores <run_dir>/evaluation/model-sigma_rel-<s>.pt (evaluation_job), so
a sweep's best_job.yaml scores what its best trial scored.
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from orchestrator.summary import VerbSummary
from ucgm_core.model_file import load_model_file, model_file_bytes
from ucgm_core.posthoc_ema import PowerFunctionEMA, Snapshot, gamma_to_sigma_rel, reconstruct, reconstruction_coefficients

logger = logging.getLogger(__name__)

SNAPSHOT_FOLDER = "ema_snapshots"
_STEP_FILE = re.compile(r"step-(\d{8})\.pt$")


def snapshot_folder(run_dir: str, sigma_rel: float) -> str:
    return storage.join(run_dir, SNAPSHOT_FOLDER, f"sigma_rel-{sigma_rel:.3f}")


def source_run(config: JobConfig) -> str:
    """The run folder whose snapshots (and model.pt: the network's settings) are reconstructed."""
    return config.posthoc_ema.run_dir or config.run_dir


def write_snapshots(config: JobConfig, averages: list[PowerFunctionEMA], step: int) -> None:
    """One snapshot of each tracked EMA at `step` (rank 0), then the oldest beyond train.keep_ema_snapshots removed."""
    for average in averages:
        folder = snapshot_folder(config.run_dir, average.sigma_rel)
        weights = {name: value.detach().float().cpu() for name, value in average.module.state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"sigma_rel": average.sigma_rel, "gamma": average.gamma, "step": step, "weights": weights}, buffer)
        storage.write_bytes(storage.join(folder, f"step-{step:08d}.pt"), buffer.getvalue())
        keep = config.train.keep_ema_snapshots
        if keep is not None:
            for old in _snapshot_steps(folder)[:-keep]:
                storage.remove(storage.join(folder, f"step-{old:08d}.pt"))


def _snapshot_steps(folder: str) -> list[int]:
    if not storage.exists(folder):
        return []
    return sorted(int(match.group(1)) for name in storage.list_names(folder) if (match := _STEP_FILE.search(name)))


def snapshot_files(config: JobConfig) -> list[str]:
    """Every snapshot file of the source run (source_run), of every tracked EMA."""
    root = storage.join(source_run(config), SNAPSHOT_FOLDER)
    if not storage.exists(root):
        return []
    files = []
    for profile in sorted(storage.list_names(root)):
        folder = storage.join(root, profile.rstrip("/").rsplit("/", 1)[-1])
        files += [storage.join(folder, f"step-{step:08d}.pt") for step in _snapshot_steps(folder)]
    return files


def output_path(config: JobConfig) -> str:
    settings = config.posthoc_ema
    return settings.out or storage.join(source_run(config), f"model-sigma_rel-{settings.sigma_rel:.3f}.pt")


def snapshot_problems(config: JobConfig) -> list[str]:
    """The `ema` verb's rules (job_checks): a length to reconstruct, snapshots to reconstruct it
    from, and the model file that gives the network's settings."""
    problems = []
    if config.posthoc_ema.sigma_rel is None:
        problems.append("posthoc_ema.sigma_rel: the EMA length to reconstruct is not set; pass sigma_rel=0.08 (EDM2's range: 0.01 to 0.25)")
    return problems + source_problems(config)


def source_problems(config: JobConfig) -> list[str]:
    """The source run holds snapshots and its model.pt (also what a sweep over sigma_rel checks)."""
    run_dir, problems = source_run(config), []
    if not snapshot_files(config):
        problems.append(
            f"train.posthoc_ema_sigma_rels: {storage.join(run_dir, SNAPSHOT_FOLDER)!r} holds no EMA snapshots; train the job with "
            "train.posthoc_ema_sigma_rels: [0.05, 0.1] (and train.posthoc_ema_every) first"
        )
    if not storage.exists(storage.join(run_dir, "model.pt")):
        problems.append(f"posthoc_ema.run_dir: {run_dir!r} has no model.pt yet (the settings of the network); let the training run finish first")
    return problems


@dataclass
class EmaSummary(VerbSummary):
    out: str
    sigma_rel: float
    step: int
    snapshots: int
    coefficients: list[float]
    seconds: float


def run_ema(config: JobConfig) -> EmaSummary:
    """Write the model file of the power-function EMA posthoc_ema.sigma_rel (up to posthoc_ema.step,
    default the last snapshot's), least-squares combined from the run's snapshots."""
    started = time.perf_counter()
    settings = config.posthoc_ema
    problems = snapshot_problems(config)
    if problems:
        raise ConfigError.of_job(problems)
    snapshots = []
    for path in snapshot_files(config):
        stored = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        if settings.step is None or stored["step"] <= settings.step:
            snapshots.append(Snapshot(float(stored["gamma"]), int(stored["step"]), stored["weights"]))
    if not snapshots:
        raise ConfigError.of_job([f"posthoc_ema.step: no snapshot at or before step {settings.step}"])
    step = settings.step or max(s.step for s in snapshots)
    coefficients = reconstruction_coefficients([(s.gamma, s.step) for s in snapshots], settings.sigma_rel, step)
    weights = reconstruct(snapshots, settings.sigma_rel, step)
    base = load_model_file(io.BytesIO(storage.read_bytes(storage.join(source_run(config), "model.pt"))))
    base.model.load_state_dict(weights)
    tracked = sorted({round(gamma_to_sigma_rel(s.gamma), 6) for s in snapshots})
    metadata = {**base.metadata, "posthoc_ema": {"sigma_rel": settings.sigma_rel, "step": step, "from_sigma_rels": tracked, "snapshots": len(snapshots)}}
    out = output_path(config)
    storage.write_bytes(
        out,
        model_file_bytes(
            base.model, settings=config.model, input_size=base.input_size, in_channels=base.in_channels, num_classes=base.num_classes,
            transport=base.transport, sampler=base.sampler, metadata=metadata,
        ),
    )
    logger.info("post-hoc EMA sigma_rel %.3f at step %d from %d snapshots of %s -> %s", settings.sigma_rel, step, len(snapshots), tracked, out)
    return EmaSummary(out, settings.sigma_rel, step, len(snapshots), [float(c) for c in coefficients], round(time.perf_counter() - started, 3))


def evaluation_job(config: JobConfig) -> JobConfig:
    """An evaluate job with posthoc_ema.sigma_rel set: the reconstruction is written into its
    evaluation folder (so concurrent trials of a sweep never share a file), and the job returned
    scores it."""
    out = storage.join(config.run_dir, "evaluation", f"model-sigma_rel-{config.posthoc_ema.sigma_rel:.3f}.pt")
    run_ema(config.model_copy(update={"posthoc_ema": config.posthoc_ema.model_copy(update={"out": out})}))
    return config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"model_file": out})})
