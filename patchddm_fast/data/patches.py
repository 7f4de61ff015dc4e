"""Random centre-biased patches of the padded volumes, and where each sample's randomness comes from.

Offsets. The original draws each axis's patch offset as randint(0, 32) + randint(0, 96), both
inclusive: for a 128^3 patch of a 256^3 volume the offset spans the whole room of 128 voxels,
with a trapezoidal distribution peaked at the centre (flat over 32..96, falling linearly to
the edges, mean 64). For other sizes, with room = volume - patch on an axis, the offset is
U{0..room // 4} + U{0..room - room // 4}: always inside the volume, the same shape of centre
bias, and exactly the original's for 256 and 128.

Randomness. A sample is identified by its sample number n (0, 1, 2, ... over the whole run):
its case and offset depend only on (seed, n). Sample n belongs to epoch n // len(cases); each
epoch visits every case once, in an order shuffled by (seed, epoch); the offset is drawn from
a generator keyed by (seed, n). So a run gives the same patches whatever the number of loader
workers, a resumed run continues with exactly the patches it would have seen, and data-parallel
ranks that read interleaved sample numbers together see the same patches as one process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

_ORDER_STREAM, _OFFSET_STREAM = 0, 1  # keeps the two uses of the seed independent


def offset_ranges(volume_shape, patch_shape) -> list[tuple[int, int]]:
    """Per axis, the inclusive upper bounds (a, b) of the two uniform terms of the offset."""
    bounds = []
    for k, (n, p) in enumerate(zip(volume_shape, patch_shape)):
        room = int(n) - int(p)
        if room < 0:
            raise ValueError(f"a patch of shape {tuple(patch_shape)} does not fit in a volume of shape "
                             f"{tuple(volume_shape)} (axis {k})")
        bounds.append((room // 4, room - room // 4))
    return bounds


def sample_offset(rng: np.random.Generator, volume_shape, patch_shape) -> tuple[int, int, int]:
    """One centre-biased patch offset (see the module's docstring)."""
    return tuple(int(rng.integers(0, a, endpoint=True) + rng.integers(0, b, endpoint=True))
                 for a, b in offset_ranges(volume_shape, patch_shape))


def epoch_order(seed: int, epoch: int, n_cases: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the cases."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n_cases)


def sample_rng(seed: int, number: int) -> np.random.Generator:
    """The generator of sample `number`'s offset."""
    return np.random.default_rng([seed, _OFFSET_STREAM, number])


class PatchSample(NamedTuple):
    """One training patch (batched by the DataLoader along a new first axis).

    input: (C + 3 + x_t channels, p, p, p) float32: the image crop, the 3 coordinate channels of
        the patch's position in the full volume, then the x_t channel(s), left zero for the
        trainer's q_sample to fill in place;
    mask: (1, p, p, p) float32 whole-tumour mask (label > 0) of the crop, the diffusion's x_0;
    offset: (3,) int64 start of the patch in the padded volume;
    case_index: index of the case in the dataset's case list.
    """

    input: torch.Tensor
    mask: torch.Tensor
    offset: torch.Tensor
    case_index: int


class StreamSampler(torch.utils.data.Sampler):
    """Sample numbers for one process: start + rank, start + rank + world_size, ... .

    `start` is the number of samples the whole job has consumed so far (steps * global batch
    when resuming). Endless unless num_samples (per process) is given.
    """

    def __init__(self, start: int = 0, *, rank: int = 0, world_size: int = 1, num_samples: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"StreamSampler: rank {rank} is not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"StreamSampler: start must be >= 0, got {start}")
        self.start, self.rank, self.world_size, self.num_samples = int(start), rank, world_size, num_samples

    def __iter__(self):
        k = 0
        while self.num_samples is None or k < self.num_samples:
            yield self.start + k * self.world_size + self.rank
            k += 1

    def __len__(self):
        if self.num_samples is None:
            raise TypeError("StreamSampler without num_samples is endless and has no length")
        return self.num_samples
