"""Sharded datasets written the way users write them: parquet shards of PNG images (columns image,
label), and latent folders in the layout `encode` writes (encoding.json, shard-*.parquet, .done)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ucgm_core.datasets import DIGITS_MAX_VALUE, LATENT_FLIPPED_COLUMN, LATENT_PARAMETERS_FILE, LATENT_SHARD


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_digit_shards(directory: str | Path, count: int, shards: int) -> list[int]:
    """sklearn's first `count` digits as 8-bit grey PNGs in `shards` parquet files of uneven
    sizes (np.array_split); returns the sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images[:count] * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = []
    for shard, rows in enumerate(np.array_split(np.arange(count), shards)):
        table = pa.table({"image": [png_bytes(pixels[i]) for i in rows], "label": bunch.target[rows].astype(np.int64)})
        pq.write_table(table, directory / f"part-{shard:05d}.parquet")
        sizes.append(len(rows))
    return sizes


def write_latent_folder(
    directory: str | Path, latents: np.ndarray, labels: np.ndarray, *, shard_size: int, num_classes: int, flipped: np.ndarray | None = None
) -> None:
    """Latents (N, C, H, W) in encode's folder layout, `shard_size` rows per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count, size = latents.shape[0], int(np.prod(latents.shape[1:]))

    def column(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32), pa.float32()), size)

    shards = -(-count // shard_size)
    for shard in range(shards):
        rows = slice(shard * shard_size, min(count, (shard + 1) * shard_size))
        columns = {
            "index": pa.array(np.arange(count)[rows], pa.int64()),
            "label": pa.array(labels[rows].astype(np.int64), pa.int64()),
            "latent": column(latents[rows]),
        }
        if flipped is not None:
            columns[LATENT_FLIPPED_COLUMN] = column(flipped[rows])
        pq.write_table(pa.table(columns), directory / f"{LATENT_SHARD.format(shard)}.parquet")
        (directory / f"{LATENT_SHARD.format(shard)}.done").write_text("{}")
    parameters = {
        "latent_shape": list(latents.shape[1:]),
        "num_images": count,
        "num_classes": num_classes,
        "shard_size": shard_size,
        "num_shards": shards,
        "vae": "synthetic",
    }
    if flipped is not None:
        parameters["horizontal_flip"] = True
    (directory / LATENT_PARAMETERS_FILE).write_text(json.dumps(parameters))
