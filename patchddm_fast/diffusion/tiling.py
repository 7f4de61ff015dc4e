"""Overlapping windows over a volume and the smooth weights that blend their predictions."""

from __future__ import annotations

import itertools
import math

import torch


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """Starts of windows of length `window` covering [0, size), spread evenly, neighbours
    overlapping by `overlap` voxels or more (rounding the starts may take one off)."""
    if not 0 < window <= size:
        raise ValueError(f"a window of {window} voxels does not fit an axis of {size}")
    if not 0 <= overlap < window:
        raise ValueError(f"the overlap ({overlap}) must be >= 0 and smaller than the window ({window})")
    if window == size:
        return [0]
    count = math.ceil((size - overlap) / (window - overlap))
    return sorted({round(k * (size - window) / (count - 1)) for k in range(count)})


def _ramp(window: int, overlap: int, low_edge: bool, high_edge: bool) -> torch.Tensor:
    """Weights along one axis: 1, falling smoothly to nearly 0 over the `overlap` voxels of each
    side that has a neighbouring window ((sin^2)^3: 1e-6 at the edge for an overlap of 8, 0.01
    a quarter of the way in), so that the voxels whose prediction sees the window's zero
    padding count least. Never exactly 0; where two windows overlap, one of them weighs at
    least sin^6(pi/4) = 1/8 per axis, so the normalisation stays well conditioned."""
    weight = torch.ones(window, dtype=torch.float64)
    if overlap == 0:
        return weight
    distance = torch.arange(window, dtype=torch.float64).clamp(max=overlap - 0.5)
    rise = torch.sin(0.5 * math.pi * (distance + 0.5) / overlap) ** 6
    if not low_edge:
        weight = torch.minimum(weight, rise)
    if not high_edge:
        weight = torch.minimum(weight, rise.flip(0))
    return weight


class Tiling:
    """Windows of `window` over a volume of `shape` (3-D), with blend weights.

    tiles: a list of (start, slices, ramps), ramps the three 1-D weight profiles of the
    window (its weight is their outer product, see weight()); inverse_total: 1 / (sum of the
    weights of all windows) over the volume, float32 on `device`.
    """

    def __init__(self, shape, window, overlap, device=None):
        self.shape, self.window, self.overlap = tuple(shape), tuple(window), tuple(overlap)
        self.device = device
        per_axis = [window_starts(n, w, o) for n, w, o in zip(self.shape, self.window, self.overlap)]
        total = torch.zeros(self.shape, dtype=torch.float64)
        self.tiles = []
        for start in itertools.product(*per_axis):
            ramps = [_ramp(w, o, s == 0, s + w == n)
                     for s, w, o, n in zip(start, self.window, self.overlap, self.shape)]
            slices = tuple(slice(s, s + w) for s, w in zip(start, self.window))
            total[slices] += _outer(ramps)
            self.tiles.append((start, slices, [r.to(device=device, dtype=torch.float32) for r in ramps]))
        self.inverse_total = (1.0 / total).to(device=device, dtype=torch.float32)

    @staticmethod
    def count(shape, window, overlap) -> int:
        return math.prod(len(window_starts(n, w, o)) for n, w, o in zip(shape, window, overlap))

    def weight(self, ramps) -> torch.Tensor:
        return _outer(ramps)

    def __len__(self) -> int:
        return len(self.tiles)


def _outer(ramps) -> torch.Tensor:
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
