"""Coordinate encoding and the one-pass assembly of PatchDDM's model input.

PatchDDM trains on patches but samples whole volumes; three extra input channels tell the
network where it is: channel k at voxel i_k of a patch at offset o_k inside a volume of size
N_k holds -1 + 2 * (o_k + i_k) / (N_k - 1), i.e. linspace(-1, 1, N_k) cropped with the patch.
assemble_input writes [image crop, coordinates, x_t] into one buffer without torch.cat and
without materialising the coordinate grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._extension import EXTENSION
from ._backends import FastOp
from ._checks import check_like, check_tensor, opmath_dtype

OP = FastOp("assemble_input", native="assemble_input", triton_module="coords")
SPATIAL = 3


def _as_triple(name: str, label: str, value) -> tuple[int, int, int]:
    values = tuple(int(v) for v in value)
    if len(values) != SPATIAL:
        raise ValueError(f"{name}: {label} must have 3 entries (D, H, W), got {tuple(value)}")
    return values


def coord_encoding(patch_shape: Sequence[int], offset: Sequence[int], full_shape: Sequence[int], *,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (3, *patch_shape) coordinate channels of a patch at `offset` in a `full_shape` volume.

    Channel k, voxel i: -1 + 2 * (offset[k] + i_k) / (full_shape[k] - 1) (an axis of size 1
    gives -1, as linspace(-1, 1, 1) does). The patch must lie inside the volume.
    """
    name = "coord_encoding"
    patch = _as_triple(name, "patch_shape", patch_shape)
    start = _as_triple(name, "offset", offset)
    full = _as_triple(name, "full_shape", full_shape)
    for k in range(SPATIAL):
        if patch[k] < 1 or start[k] < 0 or start[k] + patch[k] > full[k]:
            raise ValueError(f"{name}: a patch of shape {patch} at offset {start} does not fit in a "
                             f"volume of shape {full} (axis {k})")
    acc = opmath_dtype(dtype)
    axes = []
    for k in range(SPATIAL):
        index = torch.arange(start[k], start[k] + patch[k], dtype=acc, device=device)
        scale = 2.0 / (full[k] - 1) if full[k] > 1 else 0.0
        view = [1, 1, 1]
        view[k] = patch[k]
        axes.append((index * scale - 1.0).reshape(view).expand(patch))
    return torch.stack(axes).to(dtype)


def assemble_input_reference(volume, offsets, x_t, patch_shape, coord_shape):
    """Plain-PyTorch assemble_input (crop, coordinates, x_t, torch.cat): the test oracle."""
    batch = offsets.shape[0]
    parts = []
    for b in range(batch):
        o = [int(v) for v in offsets[b]]
        vol = volume[b if volume.shape[0] > 1 else 0]
        crop = vol[:, o[0]:o[0] + patch_shape[0], o[1]:o[1] + patch_shape[1], o[2]:o[2] + patch_shape[2]]
        row = [crop, coord_encoding(patch_shape, o, coord_shape, dtype=volume.dtype, device=volume.device)]
        if x_t is not None:
            row.append(x_t[b].to(volume.dtype))
        parts.append(torch.cat(row, dim=0))
    return torch.stack(parts)


def _normalise(name, volume, offsets, x_t, patch_shape, coord_shape):
    """Checks the arguments; returns (volume 5-D, offsets (B, 3) CPU int64, patch, coords)."""
    check_tensor(name, "volume", volume)
    if volume.dim() == 4:
        volume = volume.unsqueeze(0)
    if volume.dim() != 5:
        raise ValueError(f"{name}: volume must be (C, D, H, W) or (B, C, D, H, W), got {tuple(volume.shape)}")
    offsets = torch.as_tensor(offsets, dtype=torch.int64, device="cpu")
    if offsets.dim() == 1:
        offsets = offsets.unsqueeze(0)
    if offsets.dim() != 2 or offsets.shape[1] != SPATIAL:
        raise ValueError(f"{name}: offsets must be (3,) or (B, 3), got shape {tuple(offsets.shape)}")
    batch = offsets.shape[0]
    if volume.shape[0] not in (1, batch):
        raise ValueError(f"{name}: volume has batch {volume.shape[0]} but offsets give {batch} patches")
    full = tuple(volume.shape[2:])
    patch = _as_triple(name, "patch_shape", patch_shape if patch_shape is not None else full)
    coords = _as_triple(name, "coord_shape", coord_shape if coord_shape is not None else full)
    if min(patch) < 1:
        raise ValueError(f"{name}: patch_shape must be positive, got {patch}")
    low, high = offsets.min(dim=0).values, (offsets + torch.tensor(patch)).max(dim=0).values
    if bool((low < 0).any()) or any(int(high[k]) > full[k] for k in range(SPATIAL)):
        raise ValueError(f"{name}: patches of shape {patch} at offsets {offsets.tolist()} do not fit in "
                         f"the volume of spatial shape {full}")
    if x_t is not None:
        check_tensor(name, "x_t", x_t, ndim=5)
        check_like(name, "x_t", x_t, volume, "volume", shape=False, dtype=False)
        if x_t.shape[0] != batch or tuple(x_t.shape[2:]) != patch:
            raise ValueError(f"{name}: x_t has shape {tuple(x_t.shape)}, expected ({batch}, C, *{patch})")
    return volume, offsets, patch, coords


def assemble_input(volume, offsets, x_t=None, patch_shape=None, *, coord_shape=None, out=None,
                   backend=None):
    """The model input [image crop, 3 coordinate channels, x_t] of each patch, in one pass.

    volume: (B, C, D, H, W) or (C, D, H, W) full (padded) volumes; one volume serves all
        patches when its batch is 1. Any float dtype, any strides.
    offsets: (B, 3) or (3,) integer start of each patch (a list, tuple or tensor).
    x_t: optional (B, Cx, *patch_shape) noisy channels appended last (cast to volume's dtype).
    patch_shape: (d, h, w); default the whole volume (offset 0 builds the full-volume input).
    coord_shape: the volume size the coordinates are normalised by (default volume's).
    out: optional (B, C + 3 + Cx, *patch_shape) buffer to write into (without x_t, its last
        channels are left as they are: the sampler's noise update writes them each step).
    Returns out, or a new tensor of volume's dtype.
    """
    name = "assemble_input"
    volume, offsets, patch, coords = _normalise(name, volume, offsets, x_t, patch_shape, coord_shape)
    batch, channels = offsets.shape[0], volume.shape[1] + SPATIAL
    expected = (batch, channels + (x_t.shape[1] if x_t is not None else 0)) + patch
    if out is not None:
        check_like(name, "out", out, volume, "volume", shape=False)
        if out.dim() != 5 or out.shape[0] != batch or out.shape[1] < channels or tuple(out.shape[2:]) != patch \
                or (x_t is not None and tuple(out.shape) != expected):
            raise ValueError(f"{name}: out has shape {tuple(out.shape)}, expected {expected}")
    choice = OP.resolve(volume.device, backend)
    if choice == "torch":
        result = assemble_input_reference(volume, offsets, x_t, patch, coords)
        if out is None:
            return result
        out[:, :result.shape[1]].copy_(result)
        return out
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    if out is None:
        return ops.assemble_input(volume, offsets, x_t, list(patch), list(coords))
    ops.assemble_input_out(volume, offsets, x_t, list(patch), list(coords), out)
    return out


def fake_assemble_input(volume, offsets, x_t, patch_shape, coord_shape):
    extra = x_t.shape[1] if x_t is not None else 0
    shape = (offsets.shape[0], volume.shape[1] + SPATIAL + extra) + tuple(patch_shape)
    return volume.new_empty(shape)


def fake_assemble_input_out(volume, offsets, x_t, patch_shape, coord_shape, out):
    return None


if EXTENSION.loaded:
    torch.library.register_fake("patchddm::assemble_input")(fake_assemble_input)
    torch.library.register_fake("patchddm::assemble_input_out")(fake_assemble_input_out)
