"""A consolidated model file: the sampling (EMA) weights plus everything needed to rebuild the
network and sample from it, loadable with plain PyTorch (no Ray, no DeepSpeed).

Layout (a `torch.save` dict): format version, DiT settings, data shape, number of classes,
transport name, default sampler settings, and the state dict.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import IO, Any

import torch

from ucgm_core.dit import DiT, DiTSettings, build_dit
from ucgm_core.sampler import SamplerSettings

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelFileContents:
    model: DiT
    transport: str
    sampler: SamplerSettings
    input_size: int
    in_channels: int
    num_classes: int
    metadata: dict[str, Any]


def model_file_bytes(
    model: DiT,
    *,
    settings: DiTSettings,
    input_size: int,
    in_channels: int,
    num_classes: int,
    transport: str,
    sampler: SamplerSettings,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a model (pass the EMA copy) to bytes, so callers can write them anywhere."""
    payload = {
        "format_version": FORMAT_VERSION,
        "dit_settings": dataclasses.asdict(settings),
        "input_size": input_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "transport": transport,
        "sampler": dataclasses.asdict(sampler),
        "metadata": metadata or {},
        "state_dict": {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_model_file(source: str | IO[bytes], map_location: str | torch.device = "cpu") -> ModelFileContents:
    """Rebuild the network from a model file (a local path or an open binary file)."""
    payload = torch.load(source, map_location=map_location, weights_only=True)
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"not a ucgm model file of format {FORMAT_VERSION} (found format {version!r}); "
            "export one with `python -m orchestrator train` (it writes model.pt) "
        )
    settings = DiTSettings(**_tuples(payload["dit_settings"]))
    model = build_dit(
        settings, input_size=payload["input_size"], in_channels=payload["in_channels"], num_classes=payload["num_classes"]
    )
    model.load_state_dict(payload["state_dict"])
    return ModelFileContents(
        model=model.eval().requires_grad_(False),
        transport=payload["transport"],
        sampler=SamplerSettings(**_tuples(payload["sampler"])),
        input_size=payload["input_size"],
        in_channels=payload["in_channels"],
        num_classes=payload["num_classes"],
        metadata=payload["metadata"],
    )


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
    # dataclasses.asdict keeps tuples, but a round trip through other tools may give lists
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
