"""The VAE decoder of a latent-space model: `evaluate` and `generate` decode its samples with the
job's `encode.vae` before taking features or writing images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from orchestrator.config import JobConfig
from orchestrator.encode.vae import VaeShape, decode, fetch_vae, load_vae
from ucgm_core.model_file import ModelFileContents


@dataclass(frozen=True)
class DecoderSpec:
    """The VAE that turns a latent-space model's samples into images, small enough to send to
    every actor (each copies the VAE folder to its node once and checks the weights' sha256)."""

    vae: str
    weights_sha256: str
    shape: VaeShape

    def build(self, device: torch.device, chunk: int = 32) -> Callable[[torch.Tensor], torch.Tensor]:
        local, _ = fetch_vae(self.vae, self.weights_sha256)
        network = load_vae(local, device)
        # in chunks: the SD-VAE decoder's full-resolution activations for a whole sampling batch
        # (250 images of 256 x 256) would not fit on one GPU
        return lambda latents: torch.cat([decode(network, part, self.shape) for part in latents.split(chunk)])

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return decoded_shape(self.shape, latent_shape)


def decoded_shape(shape: VaeShape, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of the images the VAE makes of latents of `latent_shape`."""
    _, height, width = latent_shape
    return (shape.in_channels, height * shape.downsampling, width * shape.downsampling)


def latent_vae_shape(config: JobConfig, contents: ModelFileContents) -> VaeShape | None:
    """`encode.vae`'s shape when the model samples its latents (its channels are the VAE's latent
    channels), else None (a pixel model). Reads the VAE's config.json only."""
    if config.encode.vae is None:
        return None
    shape = VaeShape.read(config.encode.vae)
    return shape if contents.in_channels == shape.latent_channels else None


def decoder_spec(config: JobConfig, contents: ModelFileContents) -> DecoderSpec | None:
    """For a model trained on latents, the VAE that decodes its samples before features are
    taken or images written; None for pixel models."""
    shape = latent_vae_shape(config, contents)
    if shape is None:
        return None
    _, digest = fetch_vae(config.encode.vae, config.encode.vae_sha256)
    return DecoderSpec(config.encode.vae, digest, shape)
