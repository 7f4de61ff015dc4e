"""Coordinate encoding and the one-pass assembly of PatchDDM's model input.

PatchDDM trains on patches but samples whole volumes; three extra input channels tell the
network where it is: channel k at voxel i_k of a patch at offset o_k inside a volume of size
N_k holds -1 + 2 * (o_k + i_k) / (N_k - 1), i.e. linspace(-1, 1, N_k) cropped with the patch.
assemble_input writes [image crop, coordinates, x_t] into one buffer without torch.cat and
without materialising the coordinate grid.

Every backend computes a coordinate as one IEEE division of two exact integers,
(2j - (N - 1)) / (N - 1), in float32 (float64 for float64 data): the correctly rounded
linspace value, bit-identical across backends. torch.linspace accumulates steps instead (in
a way that depends on the CPU's vector width and on the device); it differs from ours by at
most 2^-24 here.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .._extension import EXTENSION
from ._backends import FastOp
from ._checks import FLOAT_DTYPES, check_like, check_tensor, opmath_dtype

OP = FastOp("assemble_input", native="assemble_input")
SPATIAL = 3
# Numerator and denominator of a coordinate stay exact in float32 up to this grid size.
MAX_COORD_SIZE = 2**23


def _as_triple(name: str, label: str, value) -> tuple[int, int, int]:
    try:
        values = tuple(operator.index(v) for v in value)
    except TypeError:
        raise TypeError(f"{name}: {label} must be 3 integers (D, H, W), got {value!r}") from None
    if len(values) != SPATIAL:
        raise ValueError(f"{name}: {label} must have 3 entries (D, H, W), got {tuple(value)}")
    return values


def coord_axis(start: int, length: int, size: int, *, dtype: torch.dtype = torch.float32,
               device=None) -> torch.Tensor:
    """linspace(-1, 1, size)[start:start + length], correctly rounded (see the module doc)."""
    acc = opmath_dtype(dtype)
    if size == 1:
        return torch.full((length,), -1.0, dtype=acc, device=device).to(dtype)
    j = torch.arange(start, start + length, dtype=torch.int64, device=device)
    numerator = (2 * j - (size - 1)).to(acc)
    # A tensor divisor: CUDA turns division by a scalar into a (not correctly rounded)
    # multiplication by its reciprocal.
    return (numerator / torch.full_like(numerator, size - 1)).to(dtype)


def check_coord_dtype(name: str, dtype) -> None:
    """Coordinates lie in [-1, 1]: an integer (or bool, complex) dtype would truncate them."""
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: dtype must be a floating-point dtype ({names}), got {dtype}")


def coord_encoding(patch_shape: Sequence[int], offset: Sequence[int], full_shape: Sequence[int], *,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (3, *patch_shape) coordinate channels of a patch at `offset` in a `full_shape` volume.

    Channel k, voxel i: -1 + 2 * (offset[k] + i_k) / (full_shape[k] - 1), i.e. the original's
    linspace(-1, 1, full_shape[k]) cropped with the patch (an axis of size 1 gives -1). The
    patch must lie inside the volume. Computed in float32 (float64 for float64), then cast.
    """
    name = "coord_encoding"
    check_coord_dtype(name, dtype)
    patch = _as_triple(name, "patch_shape", patch_shape)
    start = _as_triple(name, "offset", offset)
    full = _as_triple(name, "full_shape", full_shape)
    for k in range(SPATIAL):
        if patch[k] < 1 or start[k] < 0 or start[k] + patch[k] > full[k]:
            raise ValueError(f"{name}: a patch of shape {patch} at offset {start} does not fit in a "
                             f"volume of shape {full} (axis {k})")
    axes = []
    for k in range(SPATIAL):
        view = [1, 1, 1]
        view[k] = patch[k]
        axes.append(coord_axis(start[k], patch[k], full[k], dtype=dtype, device=device)
                    .reshape(view).expand(patch))
    return torch.stack(axes)


def assemble_input_reference(volume: torch.Tensor, offsets: torch.Tensor | Sequence[Sequence[int]],
                             x_t: torch.Tensor | None, patch_shape: Sequence[int],
                             coord_shape: Sequence[int]) -> torch.Tensor:
    """Plain-PyTorch assemble_input (crop, coordinates, x_t, torch.cat): the test oracle.

    volume (B or 1, C, D, H, W); offsets: (B, 3) integer tensor or rows of 3 ints.
    """
    rows = offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets
    p = tuple(patch_shape)
    parts = []
    for b, o in enumerate(rows):
        vol = volume[b if volume.shape[0] > 1 else 0]
        crop = vol[:, o[0]:o[0] + p[0], o[1]:o[1] + p[1], o[2]:o[2] + p[2]]
        row = [crop, coord_encoding(p, o, coord_shape, dtype=volume.dtype, device=volume.device)]
        if x_t is not None:
            row.append(x_t[b].to(volume.dtype))
        parts.append(torch.cat(row, dim=0))
    if not parts:
        extra = x_t.shape[1] if x_t is not None else 0
        return volume.new_empty((0, volume.shape[1] + SPATIAL + extra) + p)
    return torch.stack(parts)


def _offset_table(name: str, offsets) -> tuple[torch.Tensor, list[tuple[int, ...]] | None]:
    """offsets as the ops take them, a (B, 3) CPU int64 tensor, and as rows of Python ints.

    The rows are None only under torch.compile for a tensor argument: reading its values
    there would break the graph, so the kernels' own checks (which run on real values) stand.
    """
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
            raise TypeError(f"{name}: offsets must hold integers, got dtype {offsets.dtype}")
        # A CUDA tensor is copied to the host here (a device sync): pass CPU offsets.
        table = offsets.to(device="cpu", dtype=torch.int64)
        if table.dim() == 1:
            table = table.unsqueeze(0)
        if table.dim() != 2 or table.shape[1] != SPATIAL:
            raise ValueError(f"{name}: offsets must be (3,) or (B, 3), got shape {tuple(offsets.shape)}")
        rows = None if torch.compiler.is_compiling() else [tuple(r) for r in table.tolist()]
        return table, rows
    try:
        entries = list(offsets)
        nested = len(entries) > 0 and hasattr(entries[0], "__len__")
        rows = [tuple(operator.index(v) for v in row) for row in (entries if nested else [entries])]
    except TypeError:
        raise TypeError(f"{name}: offsets must be integers, a (3,) or (B, 3) sequence or integer "
                        f"tensor, got {offsets!r}") from None
    if any(len(row) != SPATIAL for row in rows):
        raise ValueError(f"{name}: offsets must be (3,) or (B, 3), got {offsets!r}")
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), SPATIAL), rows


def check_arguments(name: str, volume: torch.Tensor, table: torch.Tensor, rows: list[tuple[int, ...]] | None,
                    x_t: torch.Tensor | None, patch: tuple[int, int, int], coords: tuple[int, int, int],
                    out: torch.Tensor | None = None) -> None:
    """The checks of every assemble_input backend (csrc/assemble_input_args.h makes the same for
    the C++ and CUDA kernels): table is the (B, 3) CPU int64 offsets tensor, rows its values
    (None: not read), patch and coords triples."""
    check_tensor(name, "volume", volume, ndim=5)
    if not (isinstance(table, torch.Tensor) and table.device.type == "cpu" and table.dtype == torch.int64
            and table.dim() == 2 and table.shape[1] == SPATIAL):
        what = (f"{table.dtype} of shape {tuple(table.shape)} on {table.device}"
                if isinstance(table, torch.Tensor) else type(table).__name__)
        raise ValueError(f"{name}: offsets must be a CPU int64 tensor of shape (B, 3) (read on the host), "
                         f"got {what}")
    batch = table.shape[0]
    if volume.shape[0] not in (1, batch):
        raise ValueError(f"{name}: volume has batch {volume.shape[0]} but offsets give {batch} patches "
                         f"(use batch 1 to share one volume)")
    full = tuple(volume.shape[2:])
    if min(patch) < 1:
        raise ValueError(f"{name}: patch_shape must be positive, got {patch}")
    if min(coords) < 1 or max(coords) > MAX_COORD_SIZE:
        raise ValueError(f"{name}: coord_shape entries must lie in [1, 2^23], got {coords}")
    for b, row in enumerate(rows or ()):
        for k in range(SPATIAL):
            if row[k] < 0 or row[k] + patch[k] > min(full[k], coords[k]):
                raise ValueError(f"{name}: patch {b} of shape {patch} at offset {tuple(row)} does not fit "
                                 f"in the volume of spatial shape {full} and coord_shape {coords} "
                                 f"(axis {k})")
    channels = volume.shape[1] + SPATIAL
    if x_t is not None:
        check_tensor(name, "x_t", x_t, ndim=5)
        check_like(name, "x_t", x_t, volume, "volume", shape=False, dtype=False)
        if x_t.shape[0] != batch or tuple(x_t.shape[2:]) != patch:
            raise ValueError(f"{name}: x_t has shape {tuple(x_t.shape)}, expected ({batch}, C, *{patch})")
        channels += x_t.shape[1]
    if out is not None:
        check_like(name, "out", out, volume, "volume", shape=False)
        if out.dim() != 5 or out.shape[0] != batch or out.shape[1] < channels or tuple(out.shape[2:]) != patch \
                or (x_t is not None and out.shape[1] != channels):
            raise ValueError(f"{name}: out has shape {tuple(out.shape)}, expected {(batch, channels) + patch}"
                             + ("" if x_t is not None else " (or more channels, left untouched)"))


def assemble_input(volume: torch.Tensor, offsets: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
                   x_t: torch.Tensor | None = None, patch_shape: Sequence[int] | None = None, *,
                   coord_shape: Sequence[int] | None = None, out: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """The model input [image crop, 3 coordinate channels, x_t] of each patch, in one pass.

    volume: (B, C, D, H, W) or (C, D, H, W) full (padded) volumes; one volume serves all
        patches when its batch is 1. Any float dtype, any strides.
    offsets: (B, 3) or (3,) integer start of each patch: a list, tuple or integer tensor
        (CPU, read on the host; a CUDA tensor costs a device sync).
    x_t: optional (B, Cx, *patch_shape) noisy channels appended last, any float dtype (cast
        to volume's), any strides.
    patch_shape: (d, h, w); default the whole volume (offset 0 builds the full-volume input).
    coord_shape: the volume size the coordinates are normalised by (default volume's); the
        patches must lie inside it. Coordinate k at patch voxel i is
        -1 + 2 * (offsets[b, k] + i) / (coord_shape[k] - 1), -1 on an axis of size 1.
    out: optional (B, C + 3 + Cx, *patch_shape) buffer of volume's dtype, any strides, to
        write into. Without x_t it may have more channels, which are left as they are (the
        sampler's noise update writes x_t there each step).
    Returns out, or a new contiguous tensor of volume's dtype. Not differentiable.
    """
    name = "assemble_input"
    check_tensor(name, "volume", volume)
    if volume.dim() == 4:
        volume = volume.unsqueeze(0)
    if volume.dim() != 5:
        raise ValueError(f"{name}: volume must be (C, D, H, W) or (B, C, D, H, W), got {tuple(volume.shape)}")
    table, rows = _offset_table(name, offsets)
    full = tuple(volume.shape[2:])
    patch = _as_triple(name, "patch_shape", patch_shape if patch_shape is not None else full)
    coords = _as_triple(name, "coord_shape", coord_shape if coord_shape is not None else full)
    check_arguments(name, volume, table, rows, x_t, patch, coords, out)
    choice = OP.resolve(volume.device, backend)
    if choice == "torch":
        result = assemble_input_reference(volume, rows if rows is not None else table, x_t, patch, coords)
        if out is None:
            return result
        out[:, :result.shape[1]].copy_(result)
        return out
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    if out is None:
        return ops.assemble_input(volume, table, x_t, list(patch), list(coords))
    ops.assemble_input_out(volume, table, x_t, list(patch), list(coords), out)
    return out


def fake_assemble_input(volume: torch.Tensor, offsets: torch.Tensor, x_t: torch.Tensor | None,
                        patch_shape: list[int], coord_shape: list[int]) -> torch.Tensor:
    extra = x_t.shape[1] if x_t is not None else 0
    shape = (offsets.shape[0], volume.shape[1] + SPATIAL + extra) + tuple(patch_shape)
    return volume.new_empty(shape)


def fake_assemble_input_out(volume: torch.Tensor, offsets: torch.Tensor, x_t: torch.Tensor | None,
                            patch_shape: list[int], coord_shape: list[int], out: torch.Tensor) -> None:
    return None


if EXTENSION.loaded:
    torch.library.register_fake("patchddm::assemble_input")(fake_assemble_input)
    torch.library.register_fake("patchddm::assemble_input_out")(fake_assemble_input_out)
