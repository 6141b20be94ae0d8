"""Which examples each step trains on, as a pure function of the step.

The stream of examples is a sequence of epochs, each a permutation of the rows seeded by
(seed, epoch). The global batch of step k is positions [k B, (k + 1) B) of that stream, cut into
equal contiguous chunks (one per micro-batch of one worker). Resuming at step k therefore sees
exactly the data an uninterrupted run would, with nothing to save but the step, and the global
batch is the same whatever the worker count.

Two permutations of an epoch:

- all rows at once (`shuffle_window=None`), for data held in memory;
- by windows of shards (`shuffle_window=w`), for data read shard by shard while training: the
  epoch shuffles the order of the shards, cuts that order into windows of w consecutive shards,
  and shuffles the rows within each window. A worker then needs only the shards of the window it
  is in (and the next), never the whole dataset. The same order serves data held in memory, so
  both paths train on identical batches.

Horizontal flips are a function of the stream position too: position i of step k's global batch
is flipped when draw i of the generator seeded by (seed, step, FLIP_STREAM) is below 1/2.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# The tags that keep the generators of shard orders, window shuffles and flips apart from each
# other and from the all-rows permutation's (seed, epoch).
SHARD_ORDER_STREAM = 0x53484152  # "SHAR"
WINDOW_STREAM = 0x57494E44  # "WIND"
FLIP_STREAM = 0x464C4950  # "FLIP"


class ShardWindows:
    """An epoch's windows: the shards of each and the stream offsets (within the epoch) where each
    starts; `starts[j]` to `starts[j + 1]` are window j's positions."""

    def __init__(self, shards: list[np.ndarray], starts: np.ndarray):
        self.shards, self.starts = shards, starts

    def window_of(self, offsets: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, offsets, side="right") - 1


class BatchSchedule:
    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        seed: int,
        *,
        shard_sizes: Sequence[int] | None = None,
        shuffle_window: int | None = None,
    ):
        if num_examples <= 0:
            raise ValueError("the dataset is empty; check data.name / data.path / data.limit")
        if shuffle_window is not None:
            if shard_sizes is None or int(np.sum(shard_sizes)) != num_examples:
                raise ValueError(f"a shuffle window needs the shard sizes of all {num_examples} rows")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.shard_sizes = np.asarray(shard_sizes if shard_sizes is not None else [num_examples], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
        self._permutations: dict[int, np.ndarray] = {}
        self._windows: dict[int, ShardWindows] = {}

    # ------------------------------------------------------------------ the order of an epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            if self.shuffle_window is None:
                permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                windows = self.windows(epoch)
                permutation = np.concatenate([
                    self._window_rows(windows.shards[j])[np.random.default_rng([self.seed, epoch, WINDOW_STREAM, j]).permutation(
                        int(windows.starts[j + 1] - windows.starts[j]))]
                    for j in range(len(windows.shards))
                ])
            self._permutations[epoch] = permutation
        return self._permutations[epoch]

    def _window_rows(self, shards: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(self.shard_starts[s], self.shard_starts[s] + self.shard_sizes[s]) for s in shards])

    def windows(self, epoch: int) -> ShardWindows:
        """The windows of an epoch (one window of every shard without a shuffle window)."""
        if epoch not in self._windows:
            if len(self._windows) >= 3:
                self._windows.pop(min(self._windows))
            if self.shuffle_window is None:
                order, width = np.arange(len(self.shard_sizes)), len(self.shard_sizes)
            else:
                order = np.random.default_rng([self.seed, epoch, SHARD_ORDER_STREAM]).permutation(len(self.shard_sizes))
                width = self.shuffle_window
            groups = [order[i : i + width] for i in range(0, len(order), width)]
            starts = np.concatenate([[0], np.cumsum([self.shard_sizes[g].sum() for g in groups])])
            self._windows[epoch] = ShardWindows(groups, starts)
        return self._windows[epoch]

    # ------------------------------------------------------------------ positions -> rows

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The dataset rows at these stream positions."""
        epochs, offsets = np.divmod(positions, self.num_examples)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self._permutation(int(epoch))[offsets[mask]]
        return rows

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """A number per window of the whole stream (epoch e's window j: e * windows_per_epoch + j)."""
        epochs, offsets = np.divmod(positions, self.num_examples)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = int(epoch) * self.windows_per_epoch + self.windows(int(epoch)).window_of(offsets[mask])
        return ids

    @property
    def windows_per_epoch(self) -> int:
        width = self.shuffle_window or len(self.shard_sizes)
        return -(-len(self.shard_sizes) // width)

    def window_span(self, window_id: int) -> tuple[int, int, np.ndarray]:
        """(first position, end position, shards) of a window of the stream."""
        epoch, j = divmod(window_id, self.windows_per_epoch)
        windows = self.windows(epoch)
        base = epoch * self.num_examples
        return base + int(windows.starts[j]), base + int(windows.starts[j + 1]), windows.shards[j]

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """Whether the example at each stream position is flipped left-right."""
        steps, offsets = np.divmod(positions, self.global_batch_size)
        flips = np.empty(positions.shape, dtype=bool)
        for step in np.unique(steps):
            mask = steps == step
            draws = np.random.default_rng([self.seed, int(step), FLIP_STREAM]).random(self.global_batch_size)
            flips[mask] = draws[offsets[mask]] < 0.5
        return flips

    # ------------------------------------------------------------------ steps -> positions

    def chunk_size(self, num_chunks: int) -> int:
        if self.global_batch_size % num_chunks:
            raise ValueError(
                f"train.batch_size={self.global_batch_size} does not split into {num_chunks} equal micro-batches "
                "(workers x gradient_accumulation_steps); choose a batch size that is a multiple of that"
            )
        return self.global_batch_size // num_chunks

    def chunk_positions(self, step: int, chunk: int, num_chunks: int) -> np.ndarray:
        """Stream positions of chunk `chunk` of `num_chunks` equal parts of step `step`'s global batch."""
        size = self.chunk_size(num_chunks)
        first = step * self.global_batch_size + chunk * size
        return np.arange(first, first + size)

    def global_indices(self, step: int) -> torch.Tensor:
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        return torch.from_numpy(self.rows(positions))

    def chunk_indices(self, step: int, chunk: int, num_chunks: int) -> torch.Tensor:
        """Rows of chunk `chunk` of `num_chunks` equal parts of the global batch of `step`."""
        return torch.from_numpy(self.rows(self.chunk_positions(step, chunk, num_chunks)))


def step_generator(seed: int, step: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for everything random in one micro-batch (times, noise, ...), derived from
    (seed, step, chunk), so a resumed run repeats the randomness of an uninterrupted one and the
    same chunk gets the same draws whichever worker computes it."""
    state = np.random.SeedSequence([seed, step, chunk]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
