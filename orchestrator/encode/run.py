"""The `encode` verb: VAE latents of an image dataset, in shards, with Ray Data; resumable.

Latent-space models (DiT-XL/2 on ImageNet-256: 4 x 32 x 32 SD-VAE latents) train on latents
computed once. This pass reads the job's `data` images, runs the `encode.vae` AutoencoderKL over
them on a pool of actors and writes shard k with images [k * shard_size, (k + 1) * shard_size):

    encoding.json           what was encoded (data, VAE path and weights sha256, scaling and shift
                            factors, latent shape, image count, classes); a re-run with other
                            parameters is refused instead of mixing two sets
    shard-00000.parquet     columns index, label, latent (C*H*W float32, already scaled); with
                            encode.horizontal_flip also latent_flipped, the latents of the images
                            flipped left-right (for data.horizontal_flip, as ImageNet pipelines do)
    shard-00000.done        the shard's manifest, written last: a shard counts as finished only
                            when it exists

A re-run writes only the shards without a .done marker (a half-written one is rewritten from
scratch), so an interrupted encoding resumes without duplicates or gaps. A job trains on the
result with `data.name: latents` and `data.path: <encode.out>` (ucgm_core.datasets reads it).

Each actor copies the VAE folder to its node's cache once (s3:// or local), checks the weights'
sha256 against the one the driver recorded, and reads its shard's images itself (image_folder
and parquet decode only the images of that shard), so images never pass through the driver.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError, JobError
from orchestrator.actor_pools import actor_device, connect_for_pool, pool_resources
from orchestrator.shard_folders import ShardActor, check_parameters, finished_shards, mark_done, shard_span, write_parquet, write_shards
from orchestrator.encode.vae import VaeShape, encode, fetch_vae, load_vae
from orchestrator.summary import VerbSummary
from ucgm_core.datasets import LATENT_FLIPPED_COLUMN, LATENT_PARAMETERS_FILE, LATENT_SHARD, ImageSource, open_image_source

logger = logging.getLogger(__name__)



class EncodingMismatchError(JobError):
    """An output folder that holds latents encoded with other parameters."""


def image_shape_problem(shape: VaeShape, image_shape: tuple[int, int, int]) -> str | None:
    """Why the VAE cannot encode images of `image_shape` (C, H, W), or None."""
    channels, height, width = image_shape
    if channels in (1, shape.in_channels) and height % shape.downsampling == 0 and width % shape.downsampling == 0:
        return None
    return (
        f"data.image_size: the VAE takes {shape.in_channels}-channel images whose sides divide by "
        f"{shape.downsampling}; the data gives {channels}x{height}x{width} (set data.image_size to such a size)"
    )


def output_folder(config: JobConfig) -> str:
    return config.encode.out or storage.join(config.run_dir, "latents")


class LatentShardWriter(ShardActor):
    """A Ray Data actor: one VAE copy; each input row names a shard, which it encodes in batches
    and writes, marker last."""

    def __init__(self, vae: str, sha256: str, shape: VaeShape, source: list[Any], out: str, plan: dict[str, Any], cpus: float):
        import ray

        self.device = actor_device(cpus)
        local, _ = fetch_vae(vae, sha256)
        self.vae = load_vae(local, self.device)
        self.shape = shape
        self.source: ImageSource = source[0] if isinstance(source[0], ImageSource) else ray.get(source[0])
        self.out, self.plan = out, plan

    def write_shard(self, shard: int) -> int:
        plan = self.plan
        first, last = shard_span(shard, plan["shard_size"], plan["num_images"])
        latents, flipped = [], []
        for start in range(first, last, plan["batch_size"]):
            indices = list(range(start, min(start + plan["batch_size"], last)))
            images = self.source.read(indices).to(self.device)
            seeds = [plan["seed"] + i for i in indices] if plan["latent"] == "sample" else None
            latents.append(encode(self.vae, images, self.shape, sample_seeds=seeds).cpu().numpy())
            if plan["horizontal_flip"]:  # the latents of the flipped images (a flipped latent is not one)
                flipped.append(encode(self.vae, images.flip(-1), self.shape, sample_seeds=seeds).cpu().numpy())
        stacked = np.concatenate(latents)
        _write_shard(
            storage.join(self.out, f"{LATENT_SHARD.format(shard)}.parquet"), first, self.source.labels[first:last], stacked,
            np.concatenate(flipped) if flipped else None,
        )
        mark_done(self.out, shard, {"first_index": first, "count": last - first, "latent_shape": list(stacked.shape[1:])})
        return last - first


def _write_shard(path: str, first: int, labels: np.ndarray, latents: np.ndarray, flipped: np.ndarray | None = None) -> None:
    import pyarrow as pa

    count, size = latents.shape[0], int(np.prod(latents.shape[1:]))

    def column(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32, copy=False), pa.float32()), size)

    columns = {
        "index": pa.array(np.arange(first, first + count), pa.int64()),
        "label": pa.array(np.asarray(labels, dtype=np.int64), pa.int64()),
        "latent": column(latents),
    }
    if flipped is not None:
        columns[LATENT_FLIPPED_COLUMN] = column(flipped)
    write_parquet(path, columns)


@dataclass
class EncodeSummary(VerbSummary):
    out: str
    num_images: int
    latent_shape: list[int]
    shards: int
    shards_written: int
    shards_skipped: int
    images_written: int
    seconds: float
    images_per_second: float


def run_encode(config: JobConfig) -> EncodeSummary:
    """Write the latents of the job's data under encode.out, skipping shards finished by an
    earlier run (see the module docstring)."""
    import ray

    started = time.perf_counter()
    settings, data = config.encode, config.data
    out = output_folder(config)
    shape = VaeShape.read(settings.vae)
    _, sha256 = fetch_vae(settings.vae, settings.vae_sha256)
    try:
        source = open_image_source(
            data.name, path=data.path, image_size=data.image_size, limit=data.limit, split=settings.split, channels=shape.in_channels
        )
    except ValueError as error:
        raise ConfigError.of_job([f"data: {error}"]) from None
    channels, height, width = source.read([0]).shape[1:]
    # job_checks refuses a data.image_size the VAE cannot take; without one, only an image tells
    problem = image_shape_problem(shape, (channels, height, width))
    if problem:
        raise ConfigError.of_job([problem])
    latent_shape = [shape.latent_channels, height // shape.downsampling, width // shape.downsampling]
    num_images = len(source)
    num_shards = math.ceil(num_images / settings.shard_size)
    parameters = {
        "data": data.model_dump(mode="json"),
        "split": settings.split,
        "vae": settings.vae,
        "vae_weights_sha256": sha256,
        "scaling_factor": shape.scaling_factor,
        "shift_factor": shape.shift_factor,
        "latent": settings.latent,
        "seed": config.seed,
        "image_shape": [shape.in_channels, height, width],
        "latent_shape": latent_shape,
        "num_images": num_images,
        "num_classes": source.num_classes,
        "shard_size": settings.shard_size,
        "num_shards": num_shards,
    }
    if settings.horizontal_flip:  # only when set, so folders encoded before the key existed still resume
        parameters["horizontal_flip"] = True
    check_parameters(out, LATENT_PARAMETERS_FILE, parameters, error=EncodingMismatchError, holds="latents encoded", fix="encode.out")
    pending = [shard for shard in range(num_shards) if shard not in finished_shards(out)]
    logger.info(
        "encode %d images of %s (%dx%dx%d) into %s latents under %s: %d shards, %d already finished",
        num_images, source.name, shape.in_channels, height, width, "x".join(map(str, latent_shape)), out, num_shards, num_shards - len(pending),
    )
    written = 0
    if pending:
        connect_for_pool(config, settings.num_actors * settings.cpus_per_actor, section="encode")
        resources = pool_resources(settings.num_actors, settings.cpus_per_actor, settings.gpus_per_actor, "encode")
        plan = {
            "num_images": num_images, "shard_size": settings.shard_size, "batch_size": settings.batch_size, "seed": config.seed,
            "latent": settings.latent, "horizontal_flip": settings.horizontal_flip,
        }
        arguments = {"vae": settings.vae, "sha256": sha256, "shape": shape, "source": [ray.put(source)], "out": out, "plan": plan}
        written = write_shards(LatentShardWriter, pending, arguments, resources, "encode")
    seconds = time.perf_counter() - started
    return EncodeSummary(
        out=out,
        num_images=num_images,
        latent_shape=latent_shape,
        shards=num_shards,
        shards_written=len(pending),
        shards_skipped=num_shards - len(pending),
        images_written=written,
        seconds=round(seconds, 3),
        images_per_second=written / seconds,
    )
