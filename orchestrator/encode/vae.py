"""The image autoencoder of latent-space models: a diffusers `AutoencoderKL` (the SD-VAE family)
saved with `save_pretrained`, loaded from a local folder or an s3:// folder (copied once per node
into a local cache), never from a model hub.

Latents are kept scaled so that they have roughly unit variance, as the DiT expects:
    scaled = (latent - shift_factor) * scaling_factor       (SD-VAE: shift 0, scaling 0.18215)
with both factors read from the VAE's own config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from orchestrator import storage
from orchestrator.errors import ConfigError, JobError

# The weights file `from_pretrained` reads, in the order diffusers prefers them.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class VaeShape:
    """What a VAE does to an image, from its config.json alone (no weights read)."""

    in_channels: int
    latent_channels: int
    downsampling: int  # image side / latent side
    scaling_factor: float
    shift_factor: float

    @classmethod
    def read(cls, path: str) -> VaeShape:
        config_file = storage.join(path, "config.json")
        if not storage.exists(config_file):
            raise FileNotFoundError(
                f"encode.vae: no config.json in {path!r}; point it at a folder written by diffusers' "
                "AutoencoderKL.save_pretrained (local or s3://), e.g. a copy of stabilityai/sd-vae-ft-ema"
            )
        config = json.loads(storage.read_bytes(config_file))
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ConfigError.of_job([f"encode.vae: {path!r} holds a {config['_class_name']}, not an AutoencoderKL; point it at an AutoencoderKL.save_pretrained folder"])
        return cls(
            in_channels=int(config.get("in_channels", 3)),
            latent_channels=int(config.get("latent_channels", 4)),
            downsampling=2 ** (len(config.get("block_out_channels", (0,))) - 1),
            scaling_factor=float(config.get("scaling_factor") or 1.0),
            shift_factor=float(config.get("shift_factor") or 0.0),
        )


def weights_sha256(local_folder: str) -> str:
    for name in WEIGHT_FILES:
        file = os.path.join(local_folder, name)
        if os.path.isfile(file):
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    raise FileNotFoundError(f"encode.vae: no {' or '.join(WEIGHT_FILES)} in {local_folder!r}")


def fetch_vae(path: str, expected_sha256: str | None) -> tuple[str, str]:
    """(local folder, weights sha256) of the VAE at `path`; refused when the weights' sha256 is
    not `expected_sha256` (when given)."""
    local = storage.local_folder(path)
    digest = weights_sha256(local)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise JobError(f"encode.vae_sha256: the VAE weights at {path!r} have sha256 {digest}, not {expected_sha256}; wrong or corrupt download?")
    return local, digest


def load_vae(local_folder: str, device: torch.device):
    """The AutoencoderKL in `local_folder`, in eval mode on `device`."""
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage=False: the default wants the accelerate package and warns without it
    vae = AutoencoderKL.from_pretrained(local_folder, local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, shape: VaeShape, *, sample_seeds: list[int] | None = None) -> torch.Tensor:
    """Scaled latents of images in [-1, 1] (N, C, H, W): the posterior mean, or, with
    `sample_seeds`, one draw per image from its own seed (the same latent for the same image and
    seed, whatever the batch)."""
    if images.shape[1] == 1 and shape.in_channels == 3:
        images = images.expand(-1, 3, -1, -1)  # grey images as RGB
    posterior = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    latents = posterior.mean
    if sample_seeds is not None:
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in sample_seeds]
        ).to(latents.device, latents.dtype)
        latents = latents + posterior.std * noise
    return ((latents - shape.shift_factor) * shape.scaling_factor).float()


@torch.no_grad()
def decode(vae, scaled_latents: torch.Tensor, shape: VaeShape) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) from scaled latents (the inverse of `encode`'s scaling)."""
    latents = scaled_latents / shape.scaling_factor + shape.shift_factor
    return vae.decode(latents.to(next(vae.parameters()).dtype)).sample.float().clamp(-1.0, 1.0)
