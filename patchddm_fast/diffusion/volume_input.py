"""The volume a sampler is given: checked once, padded to a size the network accepts, and the
results cropped back to the input's voxel grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COORD_CHANNELS = 3
XT_CHANNELS = 1


def check_volume(volume, image_channels: int, device: torch.device, name: str = "FullVolumeSampler") -> torch.Tensor:
    """volume as (1, C, D, H, W) float32 on `device`; TypeError / ValueError naming what is wrong."""
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"{name}: the volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.dim() == 4:
        volume = volume.unsqueeze(0)
    if volume.dim() != 5 or volume.shape[0] != 1:
        raise ValueError(f"{name}: the volume must be (C, D, H, W) or (1, C, D, H, W) (one volume at a time), "
                         f"got shape {tuple(volume.shape)}")
    if not volume.is_floating_point():
        raise TypeError(f"{name}: the volume must be floating point, got {volume.dtype}")
    if volume.shape[1] != image_channels:
        raise ValueError(f"{name}: the volume has {volume.shape[1]} channels, but the model takes "
                         f"{image_channels} image channels (then {COORD_CHANNELS} coordinate channels and x_t)")
    if min(volume.shape[2:]) < 1:
        raise ValueError(f"{name}: the volume is empty, shape {tuple(volume.shape)}")
    finite = torch.isfinite(volume)
    if not bool(finite.all()):
        bad = (~finite).flatten(2).sum(dim=2)[0].tolist()
        channels = [c for c, k in enumerate(bad) if k]
        raise ValueError(f"{name}: the volume contains {sum(bad)} NaN or infinite voxels (channels {channels}); "
                         "fill them (e.g. with 0, the background) before sampling")
    return volume.to(device=device, dtype=torch.float32)


def padded_shape(shape: tuple, size_multiple: int, at_least: tuple | None = None) -> tuple:
    """The smallest shape >= shape (and >= at_least) whose sizes are multiples of size_multiple."""
    least = tuple(max(n, p) for n, p in zip(shape, at_least or shape))
    return tuple(size_multiple * math.ceil(n / size_multiple) for n in least)


def pad_before(shape: tuple, padded: tuple) -> tuple:
    """Voxels of padding before the input on each axis (the input sits in the centre)."""
    return tuple((p - n) // 2 for p, n in zip(padded, shape))


def pad_volume(volume: torch.Tensor, padded: tuple) -> torch.Tensor:
    """volume (1, C, *shape) zero-padded, centred, to (1, C, *padded)."""
    shape = tuple(volume.shape[2:])
    if tuple(padded) == shape:
        return volume
    pad = []
    for n, p in reversed(list(zip(shape, padded))):  # F.pad lists the last axis first
        pad += [(p - n) // 2, p - n - (p - n) // 2]
    return F.pad(volume, pad)
