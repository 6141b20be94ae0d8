"""What a worker trains on: the examples of its micro-batches, from memory or streamed from shards.

Both inputs give chunk c of step k as `BatchSchedule` orders it (a function of seed, step and
chunk only), so a run's batches do not depend on the input, the worker count or a resume.

- `InMemoryInput`: the dataset loaded whole (the small datasets; the default job).
- `StreamingInput` (`data.streaming: true`): parquet or latent shards read while training. With
  `data.shuffle_window: w`, an epoch visits windows of w shards in a seeded order and shuffles the
  rows within each window (orchestrator.train.batches). A worker loads, on a background thread, the
  rows its own chunks will need from the window it is in and from the next one, and drops a window
  once it has moved past it. Its memory thus holds about 2 w / W shards of decoded examples (W
  workers) plus one shard being read; every worker reads each shard once per epoch.

Why not Ray Data's `streaming_split`: it hands blocks to whichever consumer asks first, so which
rows a worker gets depends on timing, and an exact resume (mid-epoch, at another worker count)
would need the split's state. A reader that knows the order ahead (the schedule is a pure
function) can fetch exactly the rows it will need, and prefetch them, with nothing to checkpoint.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from orchestrator.train.batches import BatchSchedule
from ucgm_core.datasets import ImageDataset, ShardSet, load_dataset, open_shards

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

SHARD_READ_THREADS = 8  # shards of one window read at once (object-store latency, not CPU, bounds a read)


def _release_read_buffers() -> None:
    """Hand the memory of the shards just read back to the system: Arrow's allocator would keep
    it for reuse, and a streaming worker's memory would grow by a few shards above its bound."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()


class TrainingInput(Protocol):
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    schedule: BatchSchedule

    def batch(self, step: int, chunk: int, num_chunks: int) -> tuple[Tensor, Tensor]: ...
    def take_wait_seconds(self) -> float: ...  # seconds spent waiting for input since the last call
    def reference_batches(self, batch_size: int) -> Iterator[Tensor]: ...  # every example, in row order
    def close(self) -> None: ...


def open_training_input(config: JobConfig, *, rank: int = 0, world_size: int = 1) -> TrainingInput:
    """The job's training input; data problems that only reading shows are the job's (ConfigError),
    which a Ray Train worker does not retry."""
    data = config.data
    try:
        if data.streaming:
            shards = open_shards(data.name, path=data.path, image_size=data.image_size, limit=data.limit)
            schedule = BatchSchedule(
                len(shards), config.train.batch_size, config.seed, shard_sizes=shards.sizes, shuffle_window=data.shuffle_window
            )
            return StreamingInput(shards, schedule, flip=data.horizontal_flip, rank=rank, world_size=world_size)
        dataset = load_dataset(data.name, path=data.path, image_size=data.image_size, limit=data.limit)
        sizes = None
        if data.shuffle_window is not None:  # the same order as streaming would read (batches.py)
            sizes = open_shards(data.name, path=data.path, image_size=data.image_size, limit=data.limit).sizes
        schedule = BatchSchedule(len(dataset), config.train.batch_size, config.seed, shard_sizes=sizes, shuffle_window=data.shuffle_window)
        return InMemoryInput(dataset, schedule, flip=data.horizontal_flip)
    except (ValueError, FileNotFoundError) as error:
        # what only reading the data shows (a folder without images, images of mixed sizes)
        raise ConfigError.of_job([f"data: {error}"]) from None


class InMemoryInput:
    def __init__(self, dataset: ImageDataset, schedule: BatchSchedule, *, flip: bool):
        if flip and dataset.name.startswith("latents") and dataset.flipped is None:
            raise ValueError(f"{dataset.name} has no flipped copies; encode them with encode.horizontal_flip: true")
        self.dataset, self.schedule, self.flip = dataset, schedule, flip
        self.name, self.num_classes = dataset.name, dataset.num_classes
        self.image_shape = dataset.image_shape
        self._wait = 0.0

    def batch(self, step: int, chunk: int, num_chunks: int) -> tuple[Tensor, Tensor]:
        started = time.perf_counter()
        positions = self.schedule.chunk_positions(step, chunk, num_chunks)
        rows = torch.from_numpy(self.schedule.rows(positions))
        images, labels = self.dataset.images[rows], self.dataset.labels[rows]
        if self.flip:
            flips = torch.from_numpy(self.schedule.flips(positions))
            if self.dataset.flipped is not None:
                images[flips] = self.dataset.flipped[rows[flips]]
            else:
                images[flips] = images[flips].flip(-1)
        self._wait += time.perf_counter() - started
        return images, labels

    def take_wait_seconds(self) -> float:
        wait, self._wait = self._wait, 0.0
        return wait

    def reference_batches(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(self.dataset), batch_size):
            yield self.dataset.images[start : start + batch_size]

    def close(self) -> None:
        pass


@dataclass
class _Window:
    """The examples of one window that this worker's chunks use, by stream position (ascending)."""

    positions: np.ndarray
    examples: Tensor
    labels: Tensor

    def take(self, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        where = np.searchsorted(self.positions, positions)
        return self.examples[where], self.labels[where]


class StreamingInput:
    """Shards read window by window on background threads (see the module docstring). The memory
    bound: at most two windows are held (the current and the next), or the windows one step needs
    when a global batch spans more (a window smaller than a batch)."""

    def __init__(self, shards: ShardSet, schedule: BatchSchedule, *, flip: bool, rank: int, world_size: int):
        self.shards, self.schedule, self.flip = shards, schedule, flip
        self.rank, self.world_size = rank, world_size
        self.name, self.num_classes = f"{shards.name}:{shards.path} (streamed)", shards.num_classes
        self.image_shape = shards.image_shape
        self._windows: dict[int, Future[_Window]] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window")
        # no more threads than a window has shards: each thread's allocator arena keeps some memory
        self._readers = ThreadPoolExecutor(max_workers=min(SHARD_READ_THREADS, schedule.shuffle_window or 1), thread_name_prefix="shard")
        self._num_chunks: int | None = None
        self._wait = 0.0

    def batch(self, step: int, chunk: int, num_chunks: int) -> tuple[Tensor, Tensor]:
        if self._num_chunks is None:
            self._num_chunks = num_chunks  # fixed for the run: windows hold the rows of this worker's chunks
        elif num_chunks != self._num_chunks:
            raise RuntimeError(f"a streaming input serves {self._num_chunks} chunks per step, not {num_chunks}")
        if chunk % self.world_size != self.rank:
            raise RuntimeError(f"chunk {chunk} of step {step} belongs to rank {chunk % self.world_size}, not {self.rank}")
        positions = self.schedule.chunk_positions(step, chunk, num_chunks)
        ids = self.schedule.window_ids(positions)
        needed = [int(i) for i in np.unique(ids)]
        for window in needed:
            self._submit(window)
        for window in [w for w in self._windows if w < needed[0]]:
            del self._windows[window]  # moved past it (the stream only goes forward)
        if len(self._windows) < 2 and needed[-1] + 1 not in self._windows:
            self._submit(needed[-1] + 1)
        started = time.perf_counter()
        try:
            windows = {window: self._windows[window].result() for window in needed}
        except ValueError as error:  # undecodable or inconsistent data: the job's, not a crash to retry
            raise ConfigError.of_job([f"data: {error}"]) from None
        self._wait += time.perf_counter() - started
        examples, labels = zip(*(windows[w].take(positions[ids == w]) for w in needed))
        return torch.cat(examples), torch.cat(labels)

    def _submit(self, window: int) -> None:
        if window not in self._windows:
            self._windows[window] = self._loader.submit(self._load, window)

    def _load(self, window: int) -> _Window:
        schedule, chunk_size = self.schedule, self.schedule.chunk_size(self._num_chunks or 1)
        first, end, shard_ids = schedule.window_span(window)
        positions = np.arange(first, end)
        chunks = (positions % schedule.global_batch_size) // chunk_size
        positions = positions[chunks % self.world_size == self.rank]
        rows = schedule.rows(positions)
        flips = schedule.flips(positions) if self.flip else np.zeros(len(positions), dtype=bool)
        shard_of = np.searchsorted(schedule.shard_starts, rows, side="right") - 1
        parts = {
            int(shard): self._readers.submit(
                self._read, int(shard), rows[shard_of == shard] - schedule.shard_starts[shard], flips[shard_of == shard]
            )
            for shard in shard_ids
            if (shard_of == shard).any()
        }
        examples = torch.empty((len(positions), *self.image_shape), dtype=torch.float32)
        labels = torch.empty(len(positions), dtype=torch.int64)
        for shard, part in parts.items():
            mask = torch.from_numpy(shard_of == shard)
            examples[mask], labels[mask] = part.result()
        return _Window(positions, examples, labels)

    def _read(self, shard: int, rows: np.ndarray, flips: np.ndarray) -> tuple[Tensor, Tensor]:
        try:
            return self.shards.read(shard, rows, flips)
        finally:
            _release_read_buffers()  # on the thread that read: Arrow's allocator keeps a heap per thread

    def take_wait_seconds(self) -> float:
        wait, self._wait = self._wait, 0.0
        return wait

    def reference_batches(self, batch_size: int) -> Iterator[Tensor]:
        """Every example in row order, one shard in memory at a time (the quick score's reference)."""
        for shard, size in enumerate(self.shards.sizes):
            examples, _ = self.shards.read(shard, np.arange(size))
            for start in range(0, len(examples), batch_size):
                yield examples[start : start + batch_size]

    def close(self) -> None:
        self._windows.clear()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)
