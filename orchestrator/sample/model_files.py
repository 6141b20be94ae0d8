"""Model files: what `train` writes when it finishes (`<run_dir>/model.pt`), what `evaluate` and
`generate` sample from (`evaluation.model_file`) and what training starts from
(`train.initialize_from`, `train.teacher`). The driver reads one once, checks it, and hands it
to every actor through Ray's object store, so the same job works when the file is on the
driver's disk, on shared storage or in S3.

A model file is not a training checkpoint (what `train` resumes from); a checkpoint named where
a model file is expected is refused with the model file of its run."""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import ModelFileError
from ucgm_core.model_file import ModelFileContents, load_model_file

MODEL_FILE = "model.pt"

# The training state of a checkpoint: the Ray backend's <run>/checkpoint_N/ucgm_state.pt and the
# single-process backend's <run>/checkpoints/step_N/state.pt (orchestrator.train).
_CHECKPOINT_FOLDER = re.compile(r"^(checkpoint|step)_\d{8}$")
_CHECKPOINT_STATE_FILES = ("ucgm_state.pt", "state.pt")


def model_file_path(config: JobConfig) -> str:
    """The model file to sample from: evaluation.model_file, else the run folder's model.pt."""
    return config.evaluation.model_file or storage.join(config.run_dir, MODEL_FILE)


def read_model_file(config: JobConfig) -> tuple[bytes, ModelFileContents]:
    """The model file's bytes (to ship to actors) and its contents (for shapes and class count)."""
    return read_model_file_at("evaluation.model_file", model_file_path(config))


def read_model_file_at(key: str, path: str) -> tuple[bytes, ModelFileContents]:
    """The bytes and contents of the model file at `path`, which the job names with `key`;
    ModelFileError naming the key and the fix when it is missing or is not a model file."""
    if not storage.exists(path):
        raise ModelFileError(
            f"{key}: no model file at {path!r}; train first (python -m orchestrator train <job.yaml>) "
            f"or point {key} at a model.pt written by training (local path or s3://)"
        )
    try:
        data = storage.read_bytes(path)
        return data, load_model_file(io.BytesIO(data))
    except Exception as error:  # torch's unpickler raises many types for a foreign or truncated file
        run_model_file = _model_file_of_checkpoint(path)
        if run_model_file is not None:
            raise ModelFileError(
                f"{key}: {path!r} is a training checkpoint (what `train` resumes from), not a model file; "
                f"evaluate, generate and train.initialize_from/teacher read the model file a run writes when it "
                f"finishes, <run_dir>/{MODEL_FILE} (here: {run_model_file!r})"
            ) from None
        raise ModelFileError(
            f"{key}: {path!r} is not a model file written by `python -m orchestrator train` (cannot be read as one: "
            f"{type(error).__name__}: {error}); point it at the <run_dir>/{MODEL_FILE} of a finished training run"
        ) from None


def _model_file_of_checkpoint(path: str) -> str | None:
    """For a path into a training checkpoint (its folder or its state file), the model file of
    the checkpoint's run (`<run_dir>` itself when the run cannot be told); else None."""
    parts = path.rstrip("/").split("/")
    state_file = parts[-1] in _CHECKPOINT_STATE_FILES
    folder = parts[:-1] if state_file else parts
    if folder and _CHECKPOINT_FOLDER.match(folder[-1]):
        run = folder[:-2] if len(folder) > 1 and folder[-2] == "checkpoints" else folder[:-1]
        return "/".join([*run, MODEL_FILE])
    return f"<run_dir>/{MODEL_FILE}" if parts[-1] == _CHECKPOINT_STATE_FILES[0] else None


def actor_model_file(model: list[Any], device: torch.device) -> ModelFileContents:
    """The model file an actor is handed (its bytes, or an object ref of them; wrapped in a list
    so Ray does not resolve the ref at construction), loaded on `device`."""
    import ray

    data = model[0] if isinstance(model[0], bytes) else ray.get(model[0])
    return load_model_file(io.BytesIO(data), map_location=device)


class ActorModel:
    """What an evaluate or generate actor samples with, from the model file it is handed: the
    network on `device`, its transport, image shape and class count."""

    def __init__(self, model: list[Any], device: torch.device):
        from ucgm_core.transports import build_transport

        contents = actor_model_file(model, device)
        self.network = contents.model.to(device)
        self.transport = build_transport(contents.transport)
        self.image_shape = (contents.in_channels, contents.input_size, contents.input_size)
        self.num_classes = contents.num_classes
