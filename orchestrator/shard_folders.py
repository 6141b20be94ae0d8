"""Resumable output folders written in shards by a Ray Data actor pool (`generate`, `encode`).

A folder holds a parameters file and, per finished shard, a `shard-NNNNN.done` marker written
last. A re-run writes only the shards without a marker, and refuses a folder written with other
parameters, so two runs never mix.
"""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.errors import JobError
from orchestrator.actor_pools import ActorResources

_DONE = re.compile(r"^shard-(\d{5,})\.done$")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"



def finished_shards(out: str) -> set[int]:
    """Shards whose .done marker exists (listing fresh from the store, not from a cache)."""
    from fsspec.core import url_to_fs

    filesystem, _ = url_to_fs(out)
    filesystem.invalidate_cache()  # other processes wrote there since this one last listed
    return {int(m.group(1)) for name in storage.list_names(out) if (m := _DONE.match(name))}


def check_parameters(out: str, file_name: str, parameters: dict[str, Any], *, error: type[JobError], holds: str, fix: str) -> None:
    """Record `parameters` in a new folder; refuse an existing folder that recorded others.
    holds: what the folder holds ("a generation"); fix: the key to change ("out=")."""
    path = storage.join(out, file_name)
    parameters = json.loads(json.dumps(parameters))  # tuples -> lists, as the stored copy has them
    if storage.exists(path):
        existing = json.loads(storage.read_bytes(path))
        if existing != parameters:
            changed = sorted(k for k in set(existing) | set(parameters) if existing.get(k) != parameters.get(k))
            raise error(
                f"{out!r} holds {holds} with other parameters ({', '.join(changed)} differ); resuming would mix "
                f"two sets. Use another {fix}, or delete the folder to start over"
            )
    else:
        storage.write_bytes(path, json.dumps(parameters, indent=2).encode())


def write_shards(writer: type, pending: list[int], writer_arguments: dict[str, Any], resources: ActorResources, verb: str) -> int:
    """Run `writer` (a Ray Data callable class taking one shard per batch and returning its
    image `count`) over the pending shards on an actor pool; the number of images written."""
    import ray
    from tqdm import tqdm

    shards = ray.data.from_items([{"shard": shard} for shard in pending], override_num_blocks=len(pending))
    results = shards.map_batches(
        writer,
        fn_constructor_kwargs={**writer_arguments, "cpus": resources.cpus},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(resources.count, len(pending))),
        **resources.remote_args(),
    )
    written = 0
    with tqdm(total=len(pending), desc=verb, unit="shard") as progress:
        for row in results.iter_rows():
            written += int(row["count"])
            progress.update(1)
    return written


def shard_span(shard: int, shard_size: int, total: int) -> tuple[int, int]:
    """[first, last) item indices of `shard` when `total` items are cut into shards of `shard_size`."""
    first = shard * shard_size
    return first, min(first + shard_size, total)


def write_parquet(path: str, columns: dict[str, Any]) -> None:
    """One parquet file of pyarrow arrays, written whole (a reader never sees half a shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    storage.write_bytes(path, buffer.getvalue())


def mark_done(out: str, shard: int, manifest: dict[str, Any]) -> None:
    """The shard's `.done` marker, written after everything else of the shard."""
    storage.write_bytes(storage.join(out, f"{shard_name(shard)}.done"), json.dumps({"shard": shard, **manifest}).encode())


class ShardActor:
    """Base of the Ray Data actors that write one shard per input row (`generate`, `encode`):
    the loop over a batch of shard numbers and its timings; subclasses write one shard in
    `write_shard(shard) -> items written`, marker last (`mark_done`)."""

    def write_shard(self, shard: int) -> int:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts, seconds = [], []
        for shard in batch["shard"]:
            started = time.perf_counter()
            counts.append(self.write_shard(int(shard)))
            seconds.append(time.perf_counter() - started)
        return {"shard": np.asarray(batch["shard"], dtype=np.int64), "count": np.asarray(counts, dtype=np.int64), "seconds": np.asarray(seconds)}
