"""PatchDDM's model input in Triton: [volume crop, 3 coordinate channels, x_t] in one pass.

One program writes a (BLOCK_Y, BLOCK_X) tile of one (patch, channel, z) plane of out. The
patches' offsets live in a small int64 device tensor read inside the kernel: passed as
scalars they would be specialised on (== 1, divisible by 16) and recompile the kernel for
new patch positions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._schemas import triton_op
from ..assemble_input import SPATIAL, check_arguments, fake_assemble_input, fake_assemble_input_out

BLOCK = 2048       # output elements per program
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (tiles of a plane)


@triton.jit
def _assemble_kernel(volume_ptr, table_ptr, x_t_ptr, out_ptr,
                     vs0, vs1, vs2, vs3, vs4, xs0, xs1, xs2, xs3, xs4, os0, os1, os2, os3, os4,
                     C, channels, d, h, w, n0, n1, n2, tiles_x,
                     HAS_X_T: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    # int64 indices: the full-volume input of an ensemble exceeds 2^31 elements.
    plane = tl.program_id(0).to(tl.int64)
    z = plane % d
    c = (plane // d) % channels
    b = plane // d // channels
    tile = tl.program_id(1)
    ys = ((tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)).to(tl.int64)[:, None]
    xs = ((tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)).to(tl.int64)[None, :]
    mask = (ys < h) & (xs < w)
    o0 = tl.load(table_ptr + b * 3)
    o1 = tl.load(table_ptr + b * 3 + 1)
    o2 = tl.load(table_ptr + b * 3 + 2)
    dst = out_ptr + b * os0 + c * os1 + z * os2 + ys * os3 + xs * os4
    out_ty = out_ptr.dtype.element_ty
    if c < C:
        src = volume_ptr + b * vs0 + c * vs1 + (o0 + z) * vs2 + (o1 + ys) * vs3 + (o2 + xs) * vs4
        tl.store(dst, tl.load(src, mask=mask), mask=mask)
    elif c < C + 3:
        k = c - C
        j = tl.where(k == 0, o0 + z, tl.where(k == 1, o1 + ys, o2 + xs)) + tl.zeros_like(ys + xs)
        n = tl.where(k == 0, n0, tl.where(k == 1, n1, n2)).to(tl.int64)
        # The correctly rounded linspace value: one IEEE division of two exact integers.
        den = tl.maximum(n - 1, 1)  # an axis of size 1 gives -1 (linspace(-1, 1, 1)), set below
        if out_ty == tl.float64:
            value = (2 * j - (n - 1)).to(tl.float64) / den.to(tl.float64)
        else:
            value = tl.math.div_rn((2 * j - (n - 1)).to(tl.float32), den.to(tl.float32))
        value = tl.where(n > 1, value, -1.0)
        tl.store(dst, value.to(out_ty), mask=mask)
    elif HAS_X_T:
        src = x_t_ptr + b * xs0 + (c - C - 3) * xs1 + z * xs2 + ys * xs3 + xs * xs4
        x = tl.load(src, mask=mask)
        if x_t_ptr.dtype.element_ty == tl.float64 and out_ty != tl.float64:
            x = x.to(tl.float32)  # double to half precision through float, as torch rounds it
        tl.store(dst, x.to(out_ty), mask=mask)


def _launch(name, volume, offsets, x_t, patch_shape, coord_shape, out):
    patch, coords = tuple(patch_shape), tuple(coord_shape)
    check_arguments(name, volume, offsets, [tuple(r) for r in offsets.tolist()], x_t, patch, coords, out)
    batch, C = offsets.shape[0], volume.shape[1]
    channels = C + SPATIAL + (x_t.shape[1] if x_t is not None else 0)
    d, h, w = patch
    if batch * channels * d == 0:
        return
    table = offsets.contiguous()
    if volume.device.type != "cpu":
        table = table.pin_memory().to(volume.device, non_blocking=True)  # no device sync
    block_x = min(triton.next_power_of_2(w), BLOCK)
    block_y = min(triton.next_power_of_2(h), max(1, BLOCK // block_x))
    tiles_x = triton.cdiv(w, block_x)
    tiles = tiles_x * triton.cdiv(h, block_y)
    if tiles > MAX_GRID_Y:
        raise ValueError(f"{name}: a patch plane of {h} x {w} needs {tiles} tiles, more than {MAX_GRID_Y}")
    vs = list(volume.stride())
    if volume.shape[0] == 1:
        vs[0] = 0  # one volume serves every patch
    xs = list(x_t.stride()) if x_t is not None else [0] * 5
    _assemble_kernel[(batch * channels * d, tiles)](
        volume, table, x_t if x_t is not None else out, out, *vs, *xs, *out.stride(),
        C, channels, d, h, w, *coords, tiles_x,
        HAS_X_T=x_t is not None, BLOCK_Y=block_y, BLOCK_X=block_x)


@triton_op("assemble_input")
def assemble_input(volume, offsets, x_t, patch_shape, coord_shape):
    out = fake_assemble_input(volume, offsets, x_t, patch_shape, coord_shape)
    _launch("patchddm_triton::assemble_input", volume, offsets, x_t, patch_shape, coord_shape, out)
    return out


@triton_op("assemble_input_out")
def assemble_input_out(volume, offsets, x_t, patch_shape, coord_shape, out):
    _launch("patchddm_triton::assemble_input_out", volume, offsets, x_t, patch_shape, coord_shape, out)


assemble_input.register_fake(fake_assemble_input)
assemble_input_out.register_fake(fake_assemble_input_out)
