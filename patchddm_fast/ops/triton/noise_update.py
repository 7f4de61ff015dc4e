"""The fused noise update and Philox noise in Triton.

One program handles GROUPS Philox groups (4 * GROUPS consecutive noise indices) of one batch
element (grid axis 1), as a (GROUPS, 4) tile: Philox and the two Box-Muller pairs are
computed once per group (a (GROUPS, 1) column), and each of the four lanes picks its normal.
The arithmetic is the one of csrc/philox.h (same polynomials, same integer angle reduction),
so the noise matches the C++ and CUDA kernels to a few float32 ulps and the reference
(patchddm_fast/ops/philox.py) to 2e-6.

Seeds and offsets are passed as 32-bit halves (reinterpreted as int32): Triton types an int
argument by its value (int32, uint32 or int64), and would compile the kernel again whenever
a new seed or offset crossed one of those bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._schemas import triton_op
from ..noise_update import (NCOEF, check_arguments, check_philox_normal, fake_noise_update, fake_noise_update_out,
                            fake_philox_normal)

GROUPS = 256          # Philox groups per program: 1024 elements
MAX_GRID_ROWS = 65535  # CUDA's limit on the second grid axis (batch elements per launch)


# -- the noise (csrc/philox.h, in Triton) ------------------------------------------------------

@triton.jit
def _radius(w):
    """sqrt(-2 ln u), u = ((w >> 9) + 1/2) / 2^23; ln by e ln 2 + 2 atanh((m - 1) / (m + 1))."""
    u = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    bits = u.to(tl.uint32, bitcast=True)
    mantissa = bits & 0x007FFFFF
    above = (mantissa > 0x003504F3).to(tl.uint32)  # m > sqrt(2): halve it
    e = (bits >> 23).to(tl.int32) - 127 + above.to(tl.int32)
    m = (mantissa | (0x3F800000 - (above << 23))).to(tl.float32, bitcast=True)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = 1.0 + s2 * (0.3333333333333333 + s2 * (0.2 + s2 * (0.14285714285714285 + s2 * 0.1111111111111111)))
    ln_u = e.to(tl.float32) * 0.693147181 + 2.0 * s * series
    return tl.sqrt_rn(-2.0 * ln_u)


@triton.jit
def _angle(w):
    """(cos, sin)(2 pi u), u = ((w >> 9) + 1/2) / 2^23, reduced exactly to [-pi/4, pi/4]."""
    k = (w >> 9).to(tl.int32)
    q = (k + (1 << 20)) >> 21  # the quadrant, 0..4
    r = ((k - (q << 21)).to(tl.float32) + 0.5) * 4.76837158203125e-07  # 2^-21
    t = r * 1.57079633
    t2 = t * t
    sin_t = t * (1.0 + t2 * (-0.16666666666666666 + t2 * (0.008333333333333333 + t2 * (
        -0.0001984126984126984 + t2 * 2.755731922398589e-06))))
    cos_t = 1.0 + t2 * (-0.5 + t2 * (0.041666666666666664 + t2 * (-0.001388888888888889 + t2 * (
        2.48015873015873e-05 + t2 * -2.755731922398589e-07))))
    odd = (q & 1) != 0
    c = tl.where(odd, sin_t, cos_t)
    s = tl.where(odd, cos_t, sin_t)
    return tl.where(((q + 1) & 2) != 0, -c, c), tl.where((q & 2) != 0, -s, s)


@triton.jit
def _normals(group, seed_lo, seed_hi):
    """z(seed, 4 * group + lane) as a (GROUPS, 4) tile, from a (GROUPS, 1) column of Philox
    counters (uint64): one Philox evaluation and two Box-Muller pairs per row."""
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, zero, zero, seed_lo, seed_hi)
    r01 = _radius(w0)
    r23 = _radius(w2)
    cos01, sin01 = _angle(w1)
    cos23, sin23 = _angle(w3)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, r01 * cos01, tl.where(lane == 1, r01 * sin01, tl.where(lane == 2, r23 * cos23,
                                                                                      r23 * sin23)))


@triton.jit
def _to_math(v, IS_F64: tl.constexpr):
    """The arithmetic type: float64 for float64 data, float32 for every other dtype."""
    if IS_F64:
        r = v.to(tl.float64)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _join64(lo, hi):
    """A uint64 from two 32-bit halves passed as int32."""
    return (hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.uint64)


@triton.jit
def _row_start(row, inner, off_lo, off_hi):
    """The noise index of the row's first element (uint64)."""
    return _join64(off_lo, off_hi) + row.to(tl.uint64) * inner.to(tl.uint64)


@triton.jit
def _groups(row_start, GROUPS: tl.constexpr):
    """This program's Philox groups, a (GROUPS, 1) column (uint64). Tiles start at group
    boundaries, so a group never straddles two programs."""
    return (row_start >> 2) + tl.program_id(0).to(tl.uint64) * GROUPS + tl.arange(0, GROUPS)[:, None].to(tl.uint64)


@triton.jit
def _tile(row_start, GROUPS: tl.constexpr):
    """This program's Philox groups (uint64, (GROUPS, 1)) and the positions j in the row of
    their elements (int64, (GROUPS, 4)): element j has noise index row_start + j = 4 group + lane.
    """
    group = _groups(row_start, GROUPS)
    g = group * 4 + tl.arange(0, 4)[None, :].to(tl.uint64)
    j = (g - row_start).to(tl.int64, bitcast=True)  # the first group may start up to 3 before the row
    return group, j


@triton.jit(do_not_specialize=["inner", "row0", "seed_lo", "seed_hi", "off_lo", "off_hi"])
def _noise_update_kernel(x_ptr, eps_ptr, coef_ptr, out_ptr, x0_ptr, inner, inner_hint, row0,
                         x_stride, eps_stride, out_stride, x0_stride, coef_stride,
                         seed_lo, seed_hi, off_lo, off_hi,
                         HAS_EPS: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,
                         WANT_X0: tl.constexpr, IS_F64: tl.constexpr, ALIGNED: tl.constexpr,
                         GROUPS: tl.constexpr):
    row = row0 + tl.program_id(1).to(tl.int64)
    row_start = _row_start(row, inner, off_lo, off_hi)
    if ALIGNED:
        # Rows start on group boundaries: the tile is one flat run of 4 GROUPS elements, which
        # the compiler moves as 16-byte vectors (inner_hint is inner, left to Triton's
        # divisibility specialisation, so that the mask does not split the vectors).
        j = tl.program_id(0).to(tl.int64) * (4 * GROUPS) + tl.arange(0, 4 * GROUPS)
        mask = j < inner_hint
    else:
        group, j = _tile(row_start, GROUPS)
        mask = (j >= 0) & (j < inner)
    # 64-bit addressing: the batch stride times the row exceeds 2^31 in full-volume ensembles.
    coef = coef_ptr + row * coef_stride
    a = _to_math(tl.load(coef), IS_F64)
    b = _to_math(tl.load(coef + 1), IS_F64)
    c = _to_math(tl.load(coef + 2), IS_F64)
    d = _to_math(tl.load(coef + 3), IS_F64)
    e = _to_math(tl.load(coef + 4), IS_F64)
    s = _to_math(tl.load(coef + 5), IS_F64)
    x = _to_math(tl.load(x_ptr + row * x_stride + j, mask=mask), IS_F64)
    x0 = a * x
    if HAS_EPS:
        ev = _to_math(tl.load(eps_ptr + row * eps_stride + j, mask=mask), IS_F64)
        x0 += b * ev
    if CLIP:
        # NaN-preserving clamp, as torch.clamp
        x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))
    value = c * x0 + d * x  # ((c x0 + d x) + e eps) + s z: the reference's order of operations
    if HAS_EPS:
        value += e * ev
    if NOISE:
        key_lo, key_hi = seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)
        if ALIGNED:
            z = tl.reshape(_normals(_groups(row_start, GROUPS), key_lo, key_hi), [4 * GROUPS])
        else:
            z = _normals(group, key_lo, key_hi)
        value += s * _to_math(z, IS_F64)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * out_stride + j, value.to(ty), mask=mask)
    if WANT_X0:
        tl.store(x0_ptr + row * x0_stride + j, x0.to(ty), mask=mask)


@triton.jit(do_not_specialize=["n", "seed_lo", "seed_hi", "off_lo", "off_hi"])
def _philox_normal_kernel(out_ptr, n, n_hint, seed_lo, seed_hi, off_lo, off_hi, ALIGNED: tl.constexpr,
                          GROUPS: tl.constexpr):
    offset = _join64(off_lo, off_hi)
    key_lo, key_hi = seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)
    if ALIGNED:  # as in _noise_update_kernel: one flat run, stored as vectors
        j = tl.program_id(0).to(tl.int64) * (4 * GROUPS) + tl.arange(0, 4 * GROUPS)
        z = tl.reshape(_normals(_groups(offset, GROUPS), key_lo, key_hi), [4 * GROUPS])
        mask = j < n_hint
    else:
        group, j = _tile(offset, GROUPS)
        z = _normals(group, key_lo, key_hi)
        mask = (j >= 0) & (j < n)
    tl.store(out_ptr + j, z.to(out_ptr.dtype.element_ty), mask=mask)


# -- host side ---------------------------------------------------------------------------------

def _halves(value: int) -> tuple[int, int]:
    """The low and high 32-bit words of a value in [0, 2^64), each reinterpreted as int32."""
    def as_int32(word):
        return word - (1 << 32) if word >= (1 << 31) else word
    return as_int32(value & 0xFFFFFFFF), as_int32((value >> 32) & 0xFFFFFFFF)


def _launch(x, eps, coef, clip, add_noise, seed, offset, out, x0_out):
    batch = x.shape[0]
    if x.numel() == 0:
        return
    inner = x.numel() // batch
    coef = coef.contiguous()
    if coef.device != x.device:  # host coefficients: an asynchronous upload, no device sync
        coef = coef.pin_memory().to(x.device, non_blocking=True)
    seed_lo, seed_hi = _halves(seed if add_noise else 0)
    off_lo, off_hi = _halves(offset if add_noise else 0)
    tiles = triton.cdiv(inner + 3, 4 * GROUPS)
    # Rows on group boundaries (offset and row length multiples of 4): the vectorised tiles.
    aligned = (offset if add_noise else 0) % 4 == 0 and inner % 4 == 0
    for row0 in range(0, batch, MAX_GRID_ROWS):
        rows = min(MAX_GRID_ROWS, batch - row0)
        _noise_update_kernel[(tiles, rows)](
            x, eps if eps is not None else x, coef, out, x0_out if x0_out is not None else out, inner, inner, row0,
            x.stride(0), eps.stride(0) if eps is not None else 0, out.stride(0),
            x0_out.stride(0) if x0_out is not None else 0, 0 if coef.shape[0] == 1 else NCOEF,
            seed_lo, seed_hi, off_lo, off_hi,
            HAS_EPS=eps is not None, CLIP=bool(clip), NOISE=bool(add_noise), WANT_X0=x0_out is not None,
            IS_F64=x.dtype == torch.float64, ALIGNED=aligned, GROUPS=GROUPS)


@triton_op("noise_update")
def noise_update(x, eps, coef, clip, add_noise, seed, offset, want_x0):
    check_arguments("patchddm_triton::noise_update", x, eps, coef, add_noise, seed, offset, kernel_layout=True)
    out, x0 = fake_noise_update(x, eps, coef, clip, add_noise, seed, offset, want_x0)
    _launch(x, eps, coef, clip, add_noise, seed, offset, out, x0 if want_x0 else None)
    return out, x0


@triton_op("noise_update_out")
def noise_update_out(x, eps, coef, clip, add_noise, seed, offset, out, x0_out):
    check_arguments("patchddm_triton::noise_update_out", x, eps, coef, add_noise, seed, offset, out, x0_out,
                    kernel_layout=True)
    _launch(x, eps, coef, clip, add_noise, seed, offset, out, x0_out)


@triton_op("philox_normal")
def philox_normal(like, seed, offset):
    check_philox_normal("patchddm_triton::philox_normal", like.dtype, seed, offset)
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    n = out.numel()
    if n:
        seed_lo, seed_hi = _halves(seed)
        off_lo, off_hi = _halves(offset)
        _philox_normal_kernel[(triton.cdiv(n + 3, 4 * GROUPS),)](out, n, n, seed_lo, seed_hi, off_lo, off_hi,
                                                                 ALIGNED=offset % 4 == 0, GROUPS=GROUPS)
    return out


noise_update.register_fake(fake_noise_update)
noise_update_out.register_fake(fake_noise_update_out)
philox_normal.register_fake(fake_philox_normal)
