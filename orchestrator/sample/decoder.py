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
        _, height, width = latent_shape
        return (self.shape.in_channels, height * self.shape.downsampling, width * self.shape.downsampling)


def decoder_spec(config: JobConfig, contents: ModelFileContents) -> DecoderSpec | None:
    """For a model trained on latents (its channels are `encode.vae`'s latent channels), the VAE
    that decodes its samples before features are taken or images written; None for pixel models."""
    if config.encode.vae is None:
        return None
    shape = VaeShape.read(config.encode.vae)
    if contents.in_channels != shape.latent_channels:
        return None
    _, digest = fetch_vae(config.encode.vae, config.encode.vae_sha256)
    return DecoderSpec(config.encode.vae, digest, shape)
