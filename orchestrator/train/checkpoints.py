"""Training-state checkpoints of the single-process trainer in a run folder (local or s3://).

    <run_dir>/checkpoints/step_00000500/state.pt

A checkpoint counts only once its state.pt is completely written (local files are written under
a temporary name and moved; an object-store PUT is atomic), so an interrupted save never shadows
the previous checkpoint. Only the newest `keep` are kept.

`load_resumable_state` is the one check, for both backends, that a checkpoint can be resumed by
a job: readable, and written for the same model, data and transport.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import CheckpointError

logger = logging.getLogger(__name__)

_STEP_FOLDER = re.compile(r"^step_(\d{8})$")
STATE_FILE = "state.pt"


def checkpoint_root(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def saved_steps(run_dir: str) -> list[int]:
    root = checkpoint_root(run_dir)
    steps = []
    for name in storage.list_names(root):
        match = _STEP_FOLDER.match(name)
        if match and storage.exists(storage.join(root, name, STATE_FILE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: str) -> str | None:
    steps = saved_steps(run_dir)
    return storage.join(checkpoint_root(run_dir), f"step_{steps[-1]:08d}") if steps else None


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
    folder = storage.join(checkpoint_root(run_dir), f"step_{step:08d}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(folder, STATE_FILE), buffer.getvalue())
    for old in saved_steps(run_dir)[:-keep]:
        storage.remove(storage.join(checkpoint_root(run_dir), f"step_{old:08d}"))
    logger.info("checkpoint step %d -> %s", step, folder)
    return folder


def load_resumable_state(folder: str, config: JobConfig, state_file: str = STATE_FILE) -> dict[str, Any]:
    """The state file of a checkpoint folder (local or s3://), refused with a CheckpointError
    when it cannot be read or was written for another model, data or transport. Both backends
    resume through this, so they refuse the same checkpoints with the same words."""
    path = storage.join(folder, state_file)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and how to proceed
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); move it away to resume "
            "from an older one, or start a fresh run with another name= or output_dir="
        ) from None
    problem = compatibility_problem(state.get("config", {}), config)
    if problem:
        raise CheckpointError(f"cannot resume from checkpoint {folder}: {problem}")
    return state


def compatibility_problem(saved_config: dict[str, Any], config: JobConfig) -> str | None:
    """Why a checkpoint written under `saved_config` cannot be resumed by `config`, or None."""
    current = config.model_dump(mode="json")
    for section in ("model", "data", "transport"):
        if saved_config.get(section) != current[section]:
            return (
                f"it was written by a job with a different {section!r} section ({saved_config.get(section)!r}; "
                f"this job has {current[section]!r}). Nothing was changed: pick another name= or output_dir= "
                "for a new run, or restore the old settings to resume."
            )
    return None

