"""The `generate` verb: many images from a model file, in shards, with Ray Data; resumable.

Image i has seed `job.seed + i` and label `i mod classes` (the same convention as `evaluate`,
so image i here is sample i there for the sampler section's settings), and is a function of
(seed, label) alone: the same seed always gives the same image, whatever the shard size or the
number of actors.

Layout under `out` (local folder or s3://bucket/prefix), shard k holding images
[k * shard_size, (k + 1) * shard_size):

    generation.json             what was asked (model file, sampler, seed, sizes); a re-run with
                                different parameters is refused instead of mixing two sets
    shard-00000/00000000.png    formats: png (one file per image, named by its index)
    shard-00000.parquet         formats: parquet (columns index, seed, label, image = PNG bytes;
                                readable as a dataset: data.name=parquet)
    shard-00000.done            the shard's manifest, written last: a shard counts as finished
                                only when it exists

A re-run lists the .done markers and generates only the other shards, rewriting any half-written
one from scratch (its files are overwritten with identical bytes), so an interrupted generation
resumes with neither duplicates nor gaps.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import JobError
from orchestrator.shard_folders import ShardActor, check_parameters, finished_shards, mark_done, shard_name, shard_span, write_parquet, write_shards
from orchestrator.actor_pools import actor_device, actor_resources, connect_for_pool
from orchestrator.sample.decoder import DecoderSpec, decoder_spec
from orchestrator.sample.model_files import ActorModel, model_file_path, read_model_file
from orchestrator.summary import VerbSummary
from ucgm_core.evaluation import balanced_labels, generate
from ucgm_core.features import quantize_to_uint8
from ucgm_core.sampler import SamplerSettings

logger = logging.getLogger(__name__)

PARAMETERS_FILE = "generation.json"


class GenerationMismatchError(JobError):
    """An output folder that holds a generation with other parameters."""


def image_name(index: int) -> str:
    return f"{index:08d}.png"


def output_folder(config: JobConfig) -> str:
    return config.evaluation.generation.out or storage.join(config.run_dir, "generated")


def png_bytes(pixels: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG (grey for C = 1, RGB for C = 3)."""
    array = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


class ShardWriter(ShardActor):
    """A Ray Data actor: one model copy; each input row names a shard, which it generates in
    batches and writes, marker last."""

    def __init__(
        self,
        model: list[Any],
        settings: dict[str, Any],
        out: str,
        plan: dict[str, int],
        formats: tuple[str, ...],
        cpus: float,
        decoder: DecoderSpec | None = None,
    ):
        self.device = actor_device(cpus)
        loaded = ActorModel(model, self.device)
        self.network, self.transport, self.image_shape = loaded.network, loaded.transport, loaded.image_shape
        self.num_classes = loaded.num_classes
        self.settings = SamplerSettings(**settings)
        self.out, self.plan, self.formats = out, plan, formats
        self.decode = decoder.build(self.device) if decoder is not None else None

    def write_shard(self, shard: int) -> int:
        plan = self.plan
        first, last = shard_span(shard, plan["shard_size"], plan["num_samples"])
        rows: list[dict[str, Any]] = []
        for start in range(first, last, plan["batch_size"]):
            stop = min(start + plan["batch_size"], last)
            seeds = [plan["seed"] + i for i in range(start, stop)]
            labels = balanced_labels(stop - start, self.num_classes, start)
            images = generate(self.network, self.transport, self.settings, seeds, labels, self.image_shape, self.device, clamp=self.decode is None)
            if self.decode is not None:  # a latent-space model: its VAE makes the images
                images = self.decode(images)
            for offset, pixels in enumerate(quantize_to_uint8(images).cpu().numpy()):
                index = start + offset
                data = png_bytes(pixels)
                if "png" in self.formats:
                    storage.write_bytes(storage.join(self.out, shard_name(shard), image_name(index)), data)
                rows.append({"index": index, "seed": seeds[offset], "label": int(labels[offset]), "image": data})
        if "parquet" in self.formats:
            _write_parquet(storage.join(self.out, f"{shard_name(shard)}.parquet"), rows)
        files = [f"{shard_name(shard)}/{image_name(r['index'])}" for r in rows] if "png" in self.formats else []
        mark_done(self.out, shard, {"first_index": first, "count": len(rows), "files": files})
        return len(rows)


def _write_parquet(path: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    types = {"index": pa.int64(), "seed": pa.int64(), "label": pa.int64(), "image": pa.binary()}
    write_parquet(path, {name: pa.array([r[name] for r in rows], kind) for name, kind in types.items()})


@dataclass
class GenerateSummary(VerbSummary):
    out: str
    num_samples: int
    shards: int
    shards_written: int
    shards_skipped: int
    images_written: int
    seconds: float
    images_per_second: float


def run_generate(config: JobConfig) -> GenerateSummary:
    """Write evaluation.generation.num_samples images under evaluation.generation.out, skipping
    shards finished by an earlier run (see the module docstring)."""
    import ray

    started = time.perf_counter()
    generation = config.evaluation.generation
    out = output_folder(config)
    model_bytes, contents = read_model_file(config)
    decoder = decoder_spec(config, contents)
    image_shape = [contents.in_channels, contents.input_size, contents.input_size]
    num_shards = math.ceil(generation.num_samples / generation.shard_size)
    parameters = {
        "checkpoint": model_file_path(config),
        "checkpoint_sha256": _sha256(model_bytes),
        "sampler": dataclasses.asdict(config.sampler),
        "seed": config.seed,
        "num_samples": generation.num_samples,
        "shard_size": generation.shard_size,
        "formats": list(generation.formats),
        "image_shape": list(decoder.image_shape(tuple(image_shape))) if decoder is not None else image_shape,
        "num_classes": contents.num_classes,
    }
    if decoder is not None:
        parameters["vae_weights_sha256"] = decoder.weights_sha256
    check_parameters(out, PARAMETERS_FILE, parameters, error=GenerationMismatchError, holds="a generation", fix="out=")
    done = finished_shards(out)
    pending = [shard for shard in range(num_shards) if shard not in done]
    logger.info("generate %d images into %s: %d shards, %d already finished", generation.num_samples, out, num_shards, num_shards - len(pending))
    written = 0
    if pending:
        connect_for_pool(config)
        resources = actor_resources(config)
        model_ref = ray.put(model_bytes)
        plan = {"num_samples": generation.num_samples, "shard_size": generation.shard_size, "batch_size": config.evaluation.batch_size, "seed": config.seed}
        arguments = {
            "model": [model_ref],
            "settings": dataclasses.asdict(config.sampler),
            "out": out,
            "plan": plan,
            "formats": tuple(generation.formats),
            "decoder": decoder,
        }
        written = write_shards(ShardWriter, pending, arguments, resources, "generate")
    seconds = time.perf_counter() - started
    return GenerateSummary(
        out=out,
        num_samples=generation.num_samples,
        shards=num_shards,
        shards_written=len(pending),
        shards_skipped=num_shards - len(pending),
        images_written=written,
        seconds=round(seconds, 3),
        images_per_second=written / seconds,
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
