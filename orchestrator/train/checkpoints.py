"""Training checkpoints: the folder names both backends use, the local backend's run-folder
checkpoints, and the one check that a checkpoint can be resumed by a job.

Both backends name a checkpoint folder `checkpoint_<step, 8 digits>`:

    <run_dir>/checkpoint_00000500/            Ray Train + DeepSpeed (Ray writes these)
    <run_dir>/checkpoints/checkpoint_00000500/state.pt   the single-process backend

A local checkpoint counts only once its state.pt is completely written (local files are written
under a temporary name and moved; an object-store PUT is atomic), so an interrupted save never
shadows the previous checkpoint. Only the newest `keep` are kept. Folders named `step_XXXXXXXX`
(written before 0.2) are still read, and pruned like the others.

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

# `step_` is the local backend's folder name before 0.2, read for one release
_CHECKPOINT_FOLDER = re.compile(r"^(?:checkpoint|step)_(\d{8})$")
STATE_FILE = "state.pt"


def checkpoint_folder_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def checkpoint_folders(parent: str) -> dict[int, str]:
    """The checkpoint folders directly under `parent`, by step (new names win over old ones)."""
    found: dict[int, str] = {}
    for name in storage.list_names(parent):
        match = _CHECKPOINT_FOLDER.match(name)
        if match and (int(match.group(1)) not in found or name.startswith("checkpoint_")):
            found[int(match.group(1))] = storage.join(parent, name)
    return found


def latest_checkpoint(parent: str) -> tuple[int, str] | None:
    """(step, folder) of the newest checkpoint folder under `parent`, or None."""
    folders = checkpoint_folders(parent)
    if not folders:
        return None
    step = max(folders)
    return step, folders[step]


def checkpoint_root(run_dir: str) -> str:
    """Where the single-process backend keeps its checkpoints."""
    return storage.join(run_dir, "checkpoints")


def saved_steps(run_dir: str) -> list[int]:
    """Steps of the single-process backend's complete checkpoints (their state.pt written)."""
    folders = checkpoint_folders(checkpoint_root(run_dir))
    return sorted(step for step, folder in folders.items() if storage.exists(storage.join(folder, STATE_FILE)))


def latest_local_checkpoint(run_dir: str) -> str | None:
    """The single-process backend's newest complete checkpoint folder, or None."""
    steps = saved_steps(run_dir)
    return checkpoint_folders(checkpoint_root(run_dir))[steps[-1]] if steps else None


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
    folder = storage.join(checkpoint_root(run_dir), checkpoint_folder_name(step))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(folder, STATE_FILE), buffer.getvalue())
    folders = checkpoint_folders(checkpoint_root(run_dir))
    for old in saved_steps(run_dir)[:-keep]:
        storage.remove(folders[old])
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

