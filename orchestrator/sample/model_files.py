"""The model file `evaluate` and `generate` sample from (`evaluation.model_file`, default
`<run_dir>/model.pt`): read once by the driver, checked, and handed to every actor through Ray's
object store, so the same job works when the file is on the driver's disk, on shared storage or
in S3."""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from ucgm_core.model_file import ModelFileContents, load_model_file


def model_file_path(config: JobConfig) -> str:
    """The model file to sample from: evaluation.model_file, else the run folder's model.pt."""
    path = config.evaluation.model_file or storage.join(config.run_dir, "model.pt")
    return path if "://" in path else os.path.abspath(path)


def read_model_file(config: JobConfig) -> tuple[bytes, ModelFileContents]:
    """The model file's bytes (to ship to actors) and its contents (for shapes and class count)."""
    path = model_file_path(config)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no model file at {path!r}; train first (python -m orchestrator train <job.yaml>) "
            "or point model_file= at a model.pt written by training (local path or s3://)"
        )
    data = storage.read_bytes(path)
    return data, load_model_file(io.BytesIO(data))


def actor_model_file(model: list[Any], device: torch.device) -> ModelFileContents:
    """The model file an actor is handed (its bytes, or an object ref of them; wrapped in a list
    so Ray does not resolve the ref at construction), loaded on `device`."""
    import ray

    data = model[0] if isinstance(model[0], bytes) else ray.get(model[0])
    return load_model_file(io.BytesIO(data), map_location=device)
