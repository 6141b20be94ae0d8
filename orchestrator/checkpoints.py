"""Training-state checkpoints of the single-process trainer in a run folder (local or s3://).

    <run_dir>/checkpoints/step_00000500/state.pt

A checkpoint counts only once its state.pt is completely written (local files are written under
a temporary name and moved; an object-store PUT is atomic), so an interrupted save never shadows
the previous checkpoint. Only the newest `keep` are kept.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from orchestrator import storage
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


def load_checkpoint(folder: str) -> dict[str, Any]:
    path = storage.join(folder, STATE_FILE)
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and how to proceed
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); move it away to resume "
            "from an older one, or start a fresh run with another name= or output_dir="
        ) from None
