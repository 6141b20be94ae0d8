"""Which examples each step trains on, as a pure function of the step.

The stream of examples is a sequence of epochs, each a permutation seeded by (seed, epoch). The
global batch of step k is positions [k B, (k + 1) B) of that stream, cut into equal contiguous
chunks (one per micro-batch of one worker). Resuming at step k therefore sees exactly the data an
uninterrupted run would, with nothing to save but the step, and the global batch is the same
whatever the worker count.
"""

from __future__ import annotations

import numpy as np
import torch


class BatchSchedule:
    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples <= 0:
            raise ValueError("the dataset is empty; check data.name / data.path / data.limit")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._permutations[epoch]

    def global_indices(self, step: int) -> torch.Tensor:
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch))[offsets[mask]]
        return torch.from_numpy(indices)

    def chunk_indices(self, step: int, chunk: int, num_chunks: int) -> torch.Tensor:
        """Chunk `chunk` of `num_chunks` equal parts of the global batch of `step`."""
        if self.global_batch_size % num_chunks:
            raise ValueError(
                f"train.batch_size={self.global_batch_size} does not split into {num_chunks} equal micro-batches "
                "(workers x gradient_accumulation_steps); choose a batch size that is a multiple of that"
            )
        size = self.global_batch_size // num_chunks
        return self.global_indices(step)[chunk * size : (chunk + 1) * size]


def step_generator(seed: int, step: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for everything random in one micro-batch (times, noise, ...), derived from
    (seed, step, chunk), so a resumed run repeats the randomness of an uninterrupted one and the
    same chunk gets the same draws whichever worker computes it."""
    state = np.random.SeedSequence([seed, step, chunk]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
