"""The random draws of a training batch, every one keyed by the sample's number (the loss
itself is patchddm_fast.diffusion.diffusion_loss, with one noise key per sample).

Sample n of a run (its patch is PatchDataset item n) gets its timestep and its noise's Philox
seed from a generator keyed by (seed, n) alone. So a resumed run draws exactly what the
uninterrupted run would have drawn, and data-parallel processes, which read interleaved sample
numbers, together compute the same losses as one process on the combined batch.
"""

from __future__ import annotations

import numpy as np
import torch

_DIFFUSION_STREAM = 2  # the data module keys its draws with streams 0 and 1


def sample_numbers(samples_done: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample numbers of this process's next batch (patchddm_fast.data.patches.StreamSampler's
    order: start + rank, start + rank + world_size, ...)."""
    return [samples_done + j * world_size + rank for j in range(batch_size)]


def sample_draws(seed: int, numbers, num_timesteps: int) -> tuple[torch.Tensor, list[int]]:
    """(timesteps (B,) int64, noise seeds) of the given sample numbers."""
    timesteps, seeds = [], []
    for number in numbers:
        rng = np.random.default_rng([seed, _DIFFUSION_STREAM, int(number)])
        timesteps.append(int(rng.integers(0, num_timesteps)))
        seeds.append(int(rng.integers(0, 2**62)))
    return torch.tensor(timesteps, dtype=torch.int64), seeds
