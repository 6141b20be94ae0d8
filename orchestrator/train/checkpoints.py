"""Training checkpoints: the folder names both backends use, the manifest that commits a
checkpoint, and the one rule, for both backends and for the driver's pre-start check, of which
checkpoint a job resumes from.

Both backends name a checkpoint folder `checkpoint_<step, 8 digits>`:

    <run_dir>/checkpoint_00000500/            Ray Train + DeepSpeed (Ray writes these)
    <run_dir>/checkpoints/checkpoint_00000500/state.pt   the single-process backend

**Committed checkpoints.** Every rank that writes files into a checkpoint also writes
`manifest-rank<N>.json`: the name, size and sha256 of each of its files, the step, and the world
size and ZeRO stage that wrote it. A checkpoint counts only when the manifests of all its ranks
are there and every file they list is there at that size (`checkpoint_problem`); an upload that
was cut off, a rank that died mid-write, a truncated or deleted file all fail that. The content
(sha256) is checked where the files are read anyway: by the single-process backend, and by the
Ray workers on their downloaded copy. Ray's own `checkpoint_manager_snapshot.json` is not read
for resuming: the manifests are the one source of truth, for the driver and for the workers.

**Which checkpoint resumes** (`resumable_checkpoints`): the newest committed one whose state can
be read. A newer one that is incomplete or unreadable is skipped, left in place and named in a
warning (it is overwritten when the run reaches its step again). A job is refused only when
checkpoints exist and none is good, or when the good one was written for another model, data or
transport (a different job, not a torn checkpoint).

Folders written before manifests existed (0.2 and older; `step_XXXXXXXX` is the local backend's
name before 0.2) are resumed as before, newest first, while no folder of the run has a manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import CheckpointError

logger = logging.getLogger(__name__)

# `step_` is the local backend's folder name before 0.2, read for one release
_CHECKPOINT_FOLDER = re.compile(r"^(?:checkpoint|step)_(\d{8})$")
_MANIFEST = re.compile(r"^manifest-rank(\d{5})\.json$")
STATE_FILE = "state.pt"


def checkpoint_folder_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:05d}.json"


def checkpoint_folders(parent: str) -> dict[int, str]:
    """The checkpoint folders directly under `parent`, by step (new names win over old ones)."""
    found: dict[int, str] = {}
    for name in storage.list_names(parent):
        match = _CHECKPOINT_FOLDER.match(name)
        if match and (int(match.group(1)) not in found or name.startswith("checkpoint_")):
            found[int(match.group(1))] = storage.join(parent, name)
    return found


# --------------------------------------------------------------------------- the manifest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    local_folder: str, *, rank: int, world_size: int, step: int, zero_stage: int | None, num_chunks: int
) -> None:
    """Commit this rank's files in `local_folder` (a local directory about to be persisted):
    list every file in it with its size and sha256, then write the manifest, last."""
    files = {}
    for root, _, names in os.walk(local_folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_folder).replace(os.sep, "/")
            if _MANIFEST.match(relative) or relative.endswith(".partial"):
                continue
            files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"step": step, "rank": rank, "world_size": world_size, "zero_stage": zero_stage, "num_chunks": num_chunks, "files": files}
    storage.write_bytes(os.path.join(local_folder, manifest_name(rank)), json.dumps(manifest, indent=1).encode())


def read_manifests(folder: str) -> list[dict[str, Any]]:
    """The manifests of a checkpoint folder, by rank (empty when it has none)."""
    return [json.loads(storage.read_bytes(storage.join(folder, name))) for name in sorted(_manifest_names(folder))]


def checkpoint_problem(folder: str, *, check_content: bool) -> str | None:
    """Why `folder` is not a committed checkpoint, or None when it is: the manifests of all its
    ranks, and every file they list at its size (and, with `check_content`, its sha256: a local
    folder only, as the workers check the copy they load)."""
    try:
        manifests = read_manifests(folder)
    except Exception as error:  # a manifest cut off mid-write
        return f"a manifest cannot be read ({type(error).__name__}: {error})"
    if not manifests:
        return "it has no manifest (its write or upload did not finish)"
    world_size = manifests[0]["world_size"]
    # a torn folder rewritten by fewer ranks (a resume at fewer workers reached its step again)
    # still holds the old extra ranks' manifests, which speak of files the rewrite replaced
    manifests = [m for m in manifests if m["rank"] < world_size]
    missing = sorted(set(range(world_size)) - {m["rank"] for m in manifests})
    if missing:
        return f"the manifests of ranks {missing} of {world_size} are missing (their write or upload did not finish)"
    sizes = storage.file_sizes(folder)
    for manifest in manifests:
        for name, expected in manifest["files"].items():
            if name not in sizes:
                return f"{name} is missing"
            if sizes[name] != expected["size"]:
                return f"{name} has {sizes[name]} bytes, not the {expected['size']} its manifest lists"
            if check_content and _sha256(storage.join(folder, name)) != expected["sha256"]:
                return f"{name} does not match the sha256 its manifest lists"
    return None


def _manifest_names(folder: str) -> list[str]:
    return [name for name in storage.list_names(folder) if _MANIFEST.match(name)]


# --------------------------------------------------------------------------- which checkpoint resumes


@dataclass
class Checkpoint:
    step: int
    folder: str
    manifest: dict[str, Any] | None  # rank 0's; None for a checkpoint from before manifests
    local: str | None = None  # where it was read from (a downloaded copy, or `folder`)


def committed_checkpoints(parent: str, *, check_content: bool, skipped: list[str] | None = None) -> Iterator[Checkpoint]:
    """The committed checkpoints under `parent`, newest first; each one skipped is named in a
    warning (and in `skipped`) and left in place."""
    folders = checkpoint_folders(parent)
    legacy = not any(_manifest_names(folder) for folder in folders.values())
    if legacy and folders:
        logger.warning("the checkpoints under %s have no manifests (written before 0.3); resuming the newest readable one", parent)
    for step in sorted(folders, reverse=True):
        folder = folders[step]
        if legacy:
            yield Checkpoint(step, folder, None)
            continue
        problem = checkpoint_problem(folder, check_content=check_content)
        if problem is None:
            yield Checkpoint(step, folder, read_manifests(folder)[0])
        else:
            logger.warning("skipping checkpoint %s: %s; it is left in place", folder, problem)
            if skipped is not None:
                skipped.append(f"{os.path.basename(folder)}: {problem}")


def read_state(folder: str, config: JobConfig, state_file: str) -> dict[str, Any]:
    """The state file of a checkpoint folder, refused with a CheckpointError when it was written
    for another model, data or transport; a file that cannot be read raises UnreadableState."""
    path = storage.join(folder, state_file)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UnreadableState(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    problem = compatibility_problem(state.get("config", {}), config)
    if problem:
        raise CheckpointError(f"cannot resume from checkpoint {folder}: {problem}")
    return state


class UnreadableState(Exception):
    """A state file that cannot be loaded; its checkpoint is skipped."""


def resumable_checkpoint(
    parent: str,
    config: JobConfig,
    state_file: str,
    *,
    check_content: bool,
    open_folder: Callable[[str], str] | None = None,
) -> tuple[Checkpoint, dict[str, Any]] | None:
    """The checkpoint a job resumes from and its state, or None for a fresh run (no checkpoint
    folders). `open_folder` maps a checkpoint folder to a local copy (a Ray worker downloads it);
    the content check and the state read are then done on that copy, which `Checkpoint.local`
    names. Raises CheckpointError when folders exist and none is good, or when the good one
    belongs to another job (see the module docstring). Nothing is changed on disk."""
    skipped: list[str] = []
    for checkpoint in committed_checkpoints(parent, check_content=check_content and open_folder is None, skipped=skipped):
        checkpoint.local = open_folder(checkpoint.folder) if open_folder else checkpoint.folder
        problem = checkpoint_problem(checkpoint.local, check_content=True) if open_folder and check_content else None
        if problem is None:
            try:
                return checkpoint, read_state(checkpoint.local, config, state_file)
            except UnreadableState as error:
                problem = str(error)
        logger.warning("skipping checkpoint %s: %s; it is left in place", checkpoint.folder, problem)
        skipped.append(f"{os.path.basename(checkpoint.folder)}: {problem}")
    folders = checkpoint_folders(parent)
    if not folders:
        return None
    raise CheckpointError(
        f"no checkpoint under {parent} can be resumed ({'; '.join(skipped)}); nothing was changed: move them away to start over, "
        "or pick another name= or output_dir= for a new run"
    )


def needs_conversion(manifest: dict[str, Any] | None, world_size: int, zero_stage: int) -> bool:
    """True when DeepSpeed's `load_checkpoint` cannot read the checkpoint as it is, so that it
    is converted first (orchestrator.train.checkpoint_conversion): it was written at another ZeRO
    stage, or under ZeRO at another worker count (a ZeRO checkpoint holds one optimiser partition
    per rank). Without ZeRO at both ends the optimiser state is saved whole and loads at any
    worker count; a checkpoint from before manifests records no layout and loads as saved."""
    if manifest is None or manifest.get("zero_stage") is None:
        return False
    saved_workers, saved_stage = manifest["world_size"], manifest["zero_stage"]
    return saved_stage != zero_stage or (saved_workers != world_size and zero_stage > 0)


def prune(parent: str, keep: int) -> None:
    """Remove the committed checkpoints under `parent` older than its newest `keep` ones. A torn
    folder is never removed here (see the module docstring): it is left for a person to look at."""
    folders = checkpoint_folders(parent)
    for old in sorted(c.step for c in committed_checkpoints(parent, check_content=False))[:-keep]:
        storage.remove(folders[old])


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


# --------------------------------------------------------------------------- the single-process backend


def checkpoint_root(run_dir: str) -> str:
    """Where the single-process backend keeps its checkpoints."""
    return storage.join(run_dir, "checkpoints")


def saved_steps(run_dir: str) -> list[int]:
    """Steps of the single-process backend's committed checkpoints, oldest first."""
    return sorted(c.step for c in committed_checkpoints(checkpoint_root(run_dir), check_content=False))


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int, num_chunks: int) -> str:
    """Write state.pt, then its manifest (the commit), then prune to the newest `keep`."""
    import tempfile

    folder = storage.join(checkpoint_root(run_dir), checkpoint_folder_name(step))
    with tempfile.TemporaryDirectory() as staging:
        torch.save(state, os.path.join(staging, STATE_FILE))
        write_manifest(staging, rank=0, world_size=1, step=step, zero_stage=None, num_chunks=num_chunks)
        # the state first, the manifest last: a crash in between leaves an uncommitted folder
        for name in (STATE_FILE, manifest_name(0)):
            with open(os.path.join(staging, name), "rb") as handle:
                storage.write_bytes(storage.join(folder, name), handle.read())
    prune(checkpoint_root(run_dir), keep)
    logger.info("checkpoint step %d -> %s", step, folder)
    return folder
