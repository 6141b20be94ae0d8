"""What `evaluate`, `reference` and `generate` share: the model file, the sampler settings to run,
the feature extractor a job asks for, the Ray connection and the resources of one actor.

A model file travels to the actors through Ray's object store (read once by the driver), so the
same job works when the file is on the driver's disk, on shared storage or in S3.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from orchestrator import cluster, storage
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from orchestrator.vae import VaeShape, decode, fetch_vae, load_vae
from ucgm_core.features import DIGIT_CLASSIFIER_NAME, FeatureExtractor, build_feature_extractor
from ucgm_core.model_file import ModelFileContents, load_model_file
from ucgm_core.sampler import SamplerSettings

logger = logging.getLogger(__name__)

# Below this size an image is taken to fill its frame (sklearn's 8x8 digits) and is framed in
# MNIST's 20x20 box for the digit classifier; larger ones (MNIST itself) are stretched to 28x28.
MNIST_BOX_BELOW_SIZE = 20


def checkpoint_path(config: JobConfig) -> str:
    """The model file to sample from: evaluation.checkpoint, else the run folder's model.pt."""
    path = config.evaluation.checkpoint or storage.join(config.run_dir, "model.pt")
    return path if "://" in path else os.path.abspath(path)


def read_model_file(config: JobConfig) -> tuple[bytes, ModelFileContents]:
    """The model file's bytes (to ship to actors) and its contents (for shapes and class count)."""
    path = checkpoint_path(config)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no model file at {path!r}; train first (python -m orchestrator train <job.yaml>) "
            "or point checkpoint= at a model.pt written by training (local path or s3://)"
        )
    data = storage.read_bytes(path)
    return data, load_model_file(io.BytesIO(data))


def actor_model_file(model: list[Any], device: torch.device) -> ModelFileContents:
    """The model file an actor is handed (its bytes, or an object ref of them; wrapped in a list
    so Ray does not resolve the ref at construction), loaded on `device`."""
    import ray

    data = model[0] if isinstance(model[0], bytes) else ray.get(model[0])
    return load_model_file(io.BytesIO(data), map_location=device)


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


def sweep_settings(config: JobConfig) -> list[SamplerSettings]:
    """The sampler settings to score: the sampler section with each sweep entry applied (or the
    sampler section alone when there is no sweep)."""
    base = dataclasses.asdict(config.sampler)
    settings = []
    for index, override in enumerate(config.evaluation.sweep or ({},)):
        try:
            settings.append(SamplerSettings(**{**base, **override}))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"invalid job config:\n  evaluation.sweep: entry {index} on top of the sampler section: {error}") from None
    return settings


def describe_settings(settings: SamplerSettings, base: SamplerSettings) -> str:
    """A short name of a setting: the fields that differ from `base` (e.g. "steps_4-extrapolation_0.3"),
    usable as an MLflow metric-name suffix."""
    changed = [
        f"{field.name}_{_compact(getattr(settings, field.name))}"
        for field in dataclasses.fields(SamplerSettings)
        if getattr(settings, field.name) != getattr(base, field.name) or field.name == "steps"
    ]
    return "-".join(changed)


def _compact(value: Any) -> str:
    if isinstance(value, tuple):
        return "_".join(_compact(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build the feature extractor, small enough to send to every actor."""

    name: str
    options: dict[str, Any]

    def build(self, device: torch.device | str | None = None) -> FeatureExtractor:
        return build_feature_extractor(self.name, device=device, **self.options)


def extractor_spec(config: JobConfig, image_shape: tuple[int, int, int]) -> ExtractorSpec:
    """The job's feature extractor for images of `image_shape` (C, H, W)."""
    evaluation = config.evaluation
    channels, size, _ = image_shape
    if evaluation.extractor == DIGIT_CLASSIFIER_NAME:
        if channels != 1:
            raise ConfigError(
                f"invalid job config:\n  evaluation.extractor: {DIGIT_CLASSIFIER_NAME} reads grey images but the "
                f"model makes {channels}-channel ones; use evaluation.extractor=inception-v3-tf-pool3"
            )
        return ExtractorSpec(DIGIT_CLASSIFIER_NAME, {"framing": "mnist_box" if size < MNIST_BOX_BELOW_SIZE else "stretch"})
    if channels not in (1, 3):
        raise ConfigError(f"invalid job config:\n  evaluation.extractor: Inception reads 1- or 3-channel images, the model makes {channels}")
    weights = evaluation.inception_weights
    if weights is not None and "://" not in weights:
        weights = os.path.abspath(weights)  # actors may run in another working directory
    return ExtractorSpec(
        evaluation.extractor,
        {"weights": weights, "expected_sha256": evaluation.inception_sha256, "resize": evaluation.inception_resize},
    )


def connect(config: JobConfig, cpus_needed: float | None = None) -> None:
    """Join the cluster the job names (distributed.ray_address), or start a local one with
    `cpus_needed` CPUs (default: the evaluation actor pool's)."""
    if cpus_needed is None:
        cpus_needed = config.evaluation.num_actors * config.evaluation.cpus_per_actor
    cluster.connect(config.distributed.ray_address, cpus_needed)


@dataclass(frozen=True)
class ActorResources:
    count: int
    cpus: float
    gpus: float

    def remote_args(self) -> dict[str, float]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def actor_resources(config: JobConfig) -> ActorResources:
    """The evaluate / generate actor pool (the evaluation section's num_actors, cpus_per_actor,
    gpus_per_actor); refuses what the cluster can never place."""
    evaluation = config.evaluation
    return pool_resources(evaluation.num_actors, evaluation.cpus_per_actor, evaluation.gpus_per_actor, "evaluation")


def pool_resources(count: int, cpus: float, gpus: float | None, section: str) -> ActorResources:
    """`count` actors with `cpus` CPUs and `gpus` GPUs each (None: one GPU per actor when the
    cluster has GPUs), configured in `section`; ResourceError when the cluster cannot hold them."""
    import ray

    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cluster.check_fits(
        count,
        {"CPU": cpus, "GPU": gpus},
        f"{count} actors ({section}.num_actors)",
        f"lower {section}.num_actors, {section}.cpus_per_actor or {section}.gpus_per_actor",
    )
    return ActorResources(count, cpus, gpus)


def actor_device(cpus: float) -> torch.device:
    """The device inside an actor: its GPU when Ray gave it one, else the CPU with as many torch
    threads as the actor has CPUs (so actors on one node do not oversubscribe it)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cpu")
