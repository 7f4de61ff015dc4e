"""How a volume will be sampled: its padding, its windows (the whole volume, or tiles) and how
many ensemble members fit into one forward pass in the memory available."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .memory import device_free_bytes, format_bytes
from .tiling import Tiling
from .volume_input import COORD_CHANNELS, XT_CHANNELS, pad_before, padded_shape

FLOAT_BYTES = 4  # the buffer, x_t and the statistics are float32 whatever the model's precision


class VolumeTooLargeError(MemoryError):
    """Even one ensemble member does not fit into the memory available."""


@dataclass(frozen=True)
class SamplingPlan:
    """How a volume will be sampled: its padding, windows and ensemble chunks."""
    shape: tuple            # the input's spatial shape
    padded_shape: tuple     # what the network sees (a multiple of size_multiple on each axis)
    pad_before: tuple       # voxels of padding before the input on each axis
    window_shape: tuple     # the network's input size: padded_shape, or the tile shape
    num_windows: int        # 1, or the number of tiles
    chunk_size: int         # ensemble members per forward pass
    member_bytes: int       # memory of one more member in a chunk (estimated)
    fixed_bytes: int        # memory independent of the chunk size
    available_bytes: int    # memory the plan may use

    @property
    def crop(self) -> tuple:
        return tuple(slice(b, b + n) for b, n in zip(self.pad_before, self.shape))


@dataclass(frozen=True)
class PlanOptions:
    """How volumes may be padded, tiled and batched (FullVolumeSampler's `options`).

    image_channels: MR channels of a volume (None: the model's in_channels - 4, else 4).
    size_multiple: every spatial size the network accepts is a multiple of it (None: from the
        model: its size_multiple, or 2^(len(channel_mult) - 1); else 1).
    pad_to: a minimum padded shape, e.g. (256, 256, 256) to give the coordinates of the
        training volumes.
    tiled: run overlapping windows of tile_shape (a multiple of size_multiple) overlapping by
        tile_overlap voxels (default a quarter of the tile) instead of the whole volume.
    memory_budget: bytes to plan with (default: free device memory, or available RAM on the
        CPU); memory_fraction of it is used. max_batch caps the members per pass;
        member_bytes overrides the estimate of one member's memory.
    """
    image_channels: int | None = None
    size_multiple: int | None = None
    pad_to: tuple | int | None = None
    tiled: bool = False
    tile_shape: tuple | int = (128, 128, 128)
    tile_overlap: tuple | int | None = None
    memory_budget: int | None = None
    memory_fraction: float = 0.9
    max_batch: int | None = None
    member_bytes: int | None = None


class SamplingPlanner:
    """Plans the sampling of volumes with a model (PlanOptions says how)."""

    def __init__(self, options: PlanOptions, *, image_channels: int, size_multiple: int):
        """image_channels, size_multiple: the model's, used where the options leave them None."""
        o = options
        self.image_channels = o.image_channels if o.image_channels is not None else image_channels
        self.size_multiple = positive_int("size_multiple", o.size_multiple or size_multiple)
        self.pad_to = triple("pad_to", o.pad_to) if o.pad_to is not None else None
        self.tiled = bool(o.tiled)
        self.tile_shape = triple("tile_shape", o.tile_shape)
        if any(n % self.size_multiple for n in self.tile_shape):
            raise ValueError(f"tile_shape {self.tile_shape} must be a multiple of size_multiple {self.size_multiple}")
        self.tile_overlap = triple("tile_overlap", o.tile_overlap) if o.tile_overlap is not None else None
        if not 0 < o.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must lie in (0, 1], got {o.memory_fraction}")
        self.memory_budget, self.memory_fraction = o.memory_budget, o.memory_fraction
        self.max_batch = positive_int("max_batch", o.max_batch) if o.max_batch is not None else None
        self.member_bytes = o.member_bytes

    @property
    def channels(self) -> int:
        """Channels of the model input: image, coordinates, x_t."""
        return self.image_channels + COORD_CHANNELS + XT_CHANNELS

    def padded_shape(self, shape: tuple) -> tuple:
        at_least = self.pad_to or shape
        if self.tiled:
            at_least = tuple(max(n, t) for n, t in zip(at_least, self.tile_shape))
        return padded_shape(shape, self.size_multiple, at_least)

    def window_shape(self, padded: tuple) -> tuple:
        return tuple(min(t, p) for t, p in zip(self.tile_shape, padded)) if self.tiled else padded

    def overlap(self, window: tuple) -> tuple:
        overlap = self.tile_overlap or tuple(w // 4 for w in window)
        return tuple(min(o, w - 1) for o, w in zip(overlap, window))

    def plan(self, shape: tuple, ensemble_size: int, device: torch.device,
             forward_bytes_per_voxel: Callable[[tuple], float], precision: str) -> SamplingPlan:
        """The plan of a volume of `shape`. forward_bytes_per_voxel(window): the peak bytes per
        voxel of one member's forward pass on such a window (measured by the caller).
        Raises VolumeTooLargeError when not even one member fits."""
        padded = self.padded_shape(shape)
        window = self.window_shape(padded)
        voxels, window_voxels = math.prod(padded), math.prod(window)
        if self.member_bytes is not None:
            per_member = int(self.member_bytes)
        else:
            forward = forward_bytes_per_voxel(window) * window_voxels
            # a member's model-input (or tile) buffer, x0 and, tiled, its x_t and blended noise
            own = self.channels * window_voxels + (3 if self.tiled else 1) * voxels
            per_member = int(forward + own * FLOAT_BYTES)
        # the padded volume, the mean and M2 accumulators and, tiled, the blend weights
        fixed = (self.image_channels + 2 + (1 if self.tiled else 0)) * voxels * FLOAT_BYTES
        available = int(device_free_bytes(device, self.memory_budget) * self.memory_fraction)
        chunk = min(ensemble_size, self.max_batch or ensemble_size, (available - fixed) // max(per_member, 1))
        plan = SamplingPlan(
            shape=shape, padded_shape=padded, pad_before=pad_before(shape, padded), window_shape=window,
            num_windows=Tiling.count(padded, window, self.overlap(window)) if self.tiled else 1,
            chunk_size=max(chunk, 0), member_bytes=per_member, fixed_bytes=fixed, available_bytes=available)
        if chunk < 1:
            raise VolumeTooLargeError(self._too_large_message(plan, precision, device))
        return plan

    def _too_large_message(self, plan: SamplingPlan, precision: str, device: torch.device) -> str:
        need = plan.member_bytes + plan.fixed_bytes
        where = "tile" if self.tiled else "volume"
        advice = []
        if precision == "float32":
            advice.append("precision='bfloat16'")
        if not self.tiled:
            advice.append(f"tiled=True with a smaller tile_shape (a multiple of {self.size_multiple})")
        else:
            advice.append("a smaller tile_shape")
        source = "the memory_budget" if self.memory_budget is not None else f"free {device.type} memory"
        return (f"FullVolumeSampler: one ensemble member on a {where} of {plan.window_shape} (padded volume "
                f"{plan.padded_shape}, {precision}) needs about {format_bytes(need)}, but only "
                f"{format_bytes(plan.available_bytes)} is available ({self.memory_fraction:.0%} of {source}). "
                f"Try {' or '.join(advice)}.")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def triple(name: str, value) -> tuple:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values):
        raise ValueError(f"{name} must be an int or three non-negative ints, got {value!r}")
    return tuple(int(v) for v in values)
