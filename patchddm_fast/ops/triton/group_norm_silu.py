"""GroupNorm + SiLU (with the timestep bias and the averaging skip) in Triton.

Layout: x is (B, C, S) contiguous, so channel (b, c) is one run of S elements. A group of a
256^3 volume holds tens of millions of elements, so no kernel gives a group to one program:
the elementwise kernels run on a (B * C, chunks) grid, each program streaming one chunk of one
channel, and small per-group kernels combine the chunk sums in between.

Forward:  chunk sums of (a - shift) and its square (a = x or the rounded average, written
          here; shift = the channel's first value, so a large mean does not cancel the
          variance) -> per group mean, rstd and per channel y = silu(a * scale + shift)
          constants -> y.
Backward: chunk sums of dz, dz * xhat and xhat (dz = dy * silu'(z), recomputed from a and the
          saved statistics) -> per channel coefficients and grad_add -> grad_input.
Sums are float32 (float64 for float64 data), reduced as trees within a program.

group_norm_silu_stats: the forward's first two kernels alone (its mean and rstd).

group_norm_silu_apply: the forward's last kernel alone, with the caller's statistics, reading
x and writing out at their strides (channel runs of a contiguous tensor or of a depth slab of
one, or runs of rows of a channels-last one), its constants computed by the host in float64.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._checks import opmath_dtype
from .._schemas import triton_op
from ..group_norm_silu import (apply_constants, apply_layout, check_apply_arguments, check_arguments,
                               check_backward_arguments, check_stats_arguments, empty_stats, fake_apply,
                               fake_backward, fake_forward, fake_stats, register_autograd)
from ._common import to_acc

MAX_BLOCK = 1024     # elements per vector step of a program
MAX_ITERS = 16       # vector steps per program: a chunk holds up to 16384 elements
MAX_CHUNKS = 65535   # CUDA's limit on the second grid axis
MAX_PARTIALS = 1024  # chunk sums read at once by the per-group kernels


@triton.jit
def _channel_span(S, chunk):
    """This program's span of the elementwise (B * C, chunks) grid: channel bc, chunk k, the
    offset base of the channel's first element, and [start, end) of the chunk within it. int64:
    a batch of 256^3 volumes with many channels exceeds 2^31 elements."""
    bc = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    start = k * chunk
    return bc, k, bc * S, start, tl.minimum(start + chunk, S)


@triton.jit
def _first_value(x_ptr, skip_ptr, base, HAS_SKIP: tl.constexpr):
    """The channel's first normalised input a, which shifts its sums."""
    a = to_acc(tl.load(x_ptr + base))
    if HAS_SKIP:
        a = to_acc(((a + to_acc(tl.load(skip_ptr + base))) * 0.5).to(x_ptr.dtype.element_ty))
    return a


@triton.jit
def _stats_kernel(x_ptr, skip_ptr, avg_ptr, part_ptr, S, chunk, n_chunks,
                  HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    bc, k, base, start, end = _channel_span(S, chunk)
    shift = _first_value(x_ptr, skip_ptr, base, HAS_SKIP)
    acc_ty = part_ptr.dtype.element_ty
    s = tl.zeros([BLOCK], dtype=acc_ty)
    q = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        a = to_acc(tl.load(x_ptr + base + offs, mask=mask, other=0.0))
        if HAS_SKIP:
            rounded = ((a + to_acc(tl.load(skip_ptr + base + offs, mask=mask, other=0.0))) * 0.5).to(
                avg_ptr.dtype.element_ty)
            tl.store(avg_ptr + base + offs, rounded, mask=mask)
            a = to_acc(rounded)
        d = tl.where(mask, a - shift, 0.0)
        s += d
        q += d * d
    slot = (bc * n_chunks + k) * 2
    tl.store(part_ptr + slot, tl.sum(s, axis=0))
    tl.store(part_ptr + slot + 1, tl.sum(q, axis=0))


@triton.jit
def _sum_partials(part_ptr, row, n_chunks, width, index, BLOCK_P: tl.constexpr):
    """Sum over the chunks of channel `row` of field `index` of the (rows, chunks, width) sums."""
    total = tl.zeros([BLOCK_P], dtype=part_ptr.dtype.element_ty)
    for k0 in range(0, n_chunks, BLOCK_P):
        ks = k0 + tl.arange(0, BLOCK_P)
        total += tl.load(part_ptr + (row * n_chunks + ks) * width + index, mask=ks < n_chunks, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _group_stats_kernel(x_ptr, skip_ptr, part_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coef_ptr,
                        S, C, Cg, n_chunks, eps,
                        HAS_SKIP: tl.constexpr, HAS_ADD: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, BLOCK_P: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    acc_ty = part_ptr.dtype.element_ty
    zero = tl.sum(tl.zeros([BLOCK_P], dtype=acc_ty), axis=0)
    count = zero
    mean = zero
    m2 = zero
    # Channels merge one at a time (Chan et al.): adding `add`, constant over a channel,
    # moves only the channel's mean.
    for j in range(0, Cg):
        bc = bg * Cg + j
        s = _sum_partials(part_ptr, bc, n_chunks, 2, 0, BLOCK_P)
        q = _sum_partials(part_ptr, bc, n_chunks, 2, 1, BLOCK_P)
        m = s / S
        mean_c = _first_value(x_ptr, skip_ptr, bc * S, HAS_SKIP) + m
        if HAS_ADD:
            mean_c += to_acc(tl.load(add_ptr + bc))
        m2_c = tl.maximum(q - s * m, 0.0)
        total = count + S
        delta = mean_c - mean
        mean += delta * S / total
        m2 += m2_c + delta * delta * count * S / total
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + bg, mean)
    tl.store(rstd_ptr + bg, rstd)
    # y = silu(a * scale + shift); mean and rstd are already of the stored dtype, so these are
    # the statistics the backward reads.
    for j in range(0, Cg):
        bc = bg * Cg + j
        c = bc % C
        scale = rstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + c)
        shift = -mean * scale
        if HAS_ADD:
            shift = (to_acc(tl.load(add_ptr + bc)) - mean) * scale
        if HAS_B:
            shift += tl.load(b_ptr + c)
        tl.store(coef_ptr + bc * 2, scale)
        tl.store(coef_ptr + bc * 2 + 1, shift)


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _apply_kernel(a_ptr, coef_ptr, y_ptr, S, chunk, BLOCK: tl.constexpr):
    bc, k, base, start, end = _channel_span(S, chunk)
    scale = tl.load(coef_ptr + bc * 2)
    shift = tl.load(coef_ptr + bc * 2 + 1)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        z = to_acc(tl.load(a_ptr + base + offs, mask=mask, other=0.0)) * scale + shift
        tl.store(y_ptr + base + offs, _silu(z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_given_kernel(x_ptr, coef_ptr, y_ptr, n, C, chunk, x_batch, x_channel, y_batch, y_channel,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """group_norm_silu_apply on a (runs, chunks) grid. Channel runs (ROWS false): run r = b * C + c
    is the n = S elements of channel (b, c), at b * batch + c * channel stride. Rows: run r = b is
    the n = S * C elements of batch entry b (S rows of C channels) at b * batch stride, element
    o being channel o % C."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n)
    if ROWS:
        x_base = r * x_batch
        y_base = r * y_batch
    else:
        x_base = (r // C) * x_batch + (r % C) * x_channel
        y_base = (r // C) * y_batch + (r % C) * y_channel
        scale = tl.load(coef_ptr + r * 2)
        shift = tl.load(coef_ptr + r * 2 + 1)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        a = to_acc(tl.load(x_ptr + x_base + offs, mask=mask, other=0.0))
        if ROWS:  # the constants of each element's channel
            bc = r * C + offs % C
            z = a * tl.load(coef_ptr + bc * 2, mask=mask, other=0.0) + tl.load(coef_ptr + bc * 2 + 1, mask=mask,
                                                                                other=0.0)
        else:
            z = a * scale + shift
        tl.store(y_ptr + y_base + offs, _silu(z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_constants(add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, bc, C, Cg,
                       HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(rstd, q, w, b) of channel bc: xhat = a * rstd + q, z = xhat * w + b."""
    bg = bc // Cg
    c = bc % C
    rstd = tl.load(rstd_ptr + bg)
    q = -tl.load(mean_ptr + bg) * rstd
    if HAS_ADD:
        q = (to_acc(tl.load(add_ptr + bc)) - tl.load(mean_ptr + bg)) * rstd
    w = rstd * 0.0 + 1.0
    if HAS_W:
        w = tl.load(w_ptr + c)
    b = rstd * 0.0
    if HAS_B:
        b = tl.load(b_ptr + c)
    return rstd, q, w, b


@triton.jit
def _grad_z(dy, z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _grad_stats_kernel(dy_ptr, a_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
                       S, C, Cg, chunk, n_chunks,
                       HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK: tl.constexpr):
    bc, k, base, start, end = _channel_span(S, chunk)
    rstd, q, w, b = _channel_constants(add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, bc, C, Cg,
                                       HAS_ADD, HAS_W, HAS_B)
    acc_ty = part_ptr.dtype.element_ty
    s_dz = tl.zeros([BLOCK], dtype=acc_ty)
    s_dzx = tl.zeros([BLOCK], dtype=acc_ty)
    s_x = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        xhat = to_acc(tl.load(a_ptr + base + offs, mask=mask, other=0.0)) * rstd + q
        dz = _grad_z(to_acc(tl.load(dy_ptr + base + offs, mask=mask, other=0.0)), xhat * w + b)
        xhat = tl.where(mask, xhat, 0.0)
        s_dz += dz  # dy is 0 where masked, so is dz
        s_dzx += dz * xhat
        s_x += xhat
    slot = (bc * n_chunks + k) * 3
    tl.store(part_ptr + slot, tl.sum(s_dz, axis=0))
    tl.store(part_ptr + slot + 1, tl.sum(s_dzx, axis=0))
    tl.store(part_ptr + slot + 2, tl.sum(s_x, axis=0))


@triton.jit
def _group_grad_kernel(part_ptr, w_ptr, rstd_ptr, channel_ptr, coef_ptr, grad_add_ptr,
                       S, C, Cg, n_chunks,
                       HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, BLOCK_P: tl.constexpr):
    # du = rstd * (w dz - m1 - xhat m2), m1 and m2 the group means of w dz and w dz xhat.
    bg = tl.program_id(0).to(tl.int64)
    acc_ty = part_ptr.dtype.element_ty
    m1 = tl.sum(tl.zeros([BLOCK_P], dtype=acc_ty), axis=0)
    m2 = m1
    for j in range(0, Cg):
        bc = bg * Cg + j
        s_dz = _sum_partials(part_ptr, bc, n_chunks, 3, 0, BLOCK_P)
        s_dzx = _sum_partials(part_ptr, bc, n_chunks, 3, 1, BLOCK_P)
        s_x = _sum_partials(part_ptr, bc, n_chunks, 3, 2, BLOCK_P)
        tl.store(channel_ptr + bc * 3, s_dz)
        tl.store(channel_ptr + bc * 3 + 1, s_dzx)
        tl.store(channel_ptr + bc * 3 + 2, s_x)
        if HAS_W:
            w = tl.load(w_ptr + bc % C)
            s_dz = s_dz * w
            s_dzx = s_dzx * w
        m1 += s_dz
        m2 += s_dzx
    m1 = m1 / Cg / S  # not Cg * S, which can overflow int32
    m2 = m2 / Cg / S
    rstd = tl.load(rstd_ptr + bg)
    for j in range(0, Cg):
        bc = bg * Cg + j
        c1 = rstd
        if HAS_W:
            c1 = rstd * tl.load(w_ptr + bc % C)
        c2 = -rstd * m2
        c3 = -rstd * m1
        tl.store(coef_ptr + bc * 3, c1)
        tl.store(coef_ptr + bc * 3 + 1, c2)
        tl.store(coef_ptr + bc * 3 + 2, c3)
        if HAS_ADD:
            # The channel sums again from the chunk sums (written by an earlier kernel): reading
            # back this program's own scalar stores would need a barrier.
            s_dz = _sum_partials(part_ptr, bc, n_chunks, 3, 0, BLOCK_P)
            s_x = _sum_partials(part_ptr, bc, n_chunks, 3, 2, BLOCK_P)
            tl.store(grad_add_ptr + bc, c1 * s_dz + c2 * s_x + c3 * S)


@triton.jit
def _grad_apply_kernel(dy_ptr, a_ptr, grad_avg_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coef_ptr,
                       grad_in_ptr, S, C, Cg, chunk, input_scale,
                       HAS_GRAD_AVG: tl.constexpr, HAS_ADD: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    bc, k, base, start, end = _channel_span(S, chunk)
    rstd, q, w, b = _channel_constants(add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, bc, C, Cg,
                                       HAS_ADD, HAS_W, HAS_B)
    c1 = tl.load(coef_ptr + bc * 3)
    c2 = tl.load(coef_ptr + bc * 3 + 1)
    c3 = tl.load(coef_ptr + bc * 3 + 2)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        xhat = to_acc(tl.load(a_ptr + base + offs, mask=mask, other=0.0)) * rstd + q
        dz = _grad_z(to_acc(tl.load(dy_ptr + base + offs, mask=mask, other=0.0)), xhat * w + b)
        g = c1 * dz + c2 * xhat + c3
        if HAS_GRAD_AVG:
            g += to_acc(tl.load(grad_avg_ptr + base + offs, mask=mask, other=0.0))
        tl.store(grad_in_ptr + base + offs, (g * input_scale).to(grad_in_ptr.dtype.element_ty), mask=mask)


# -- host side --------------------------------------------------------------------------------

def _chunking(S: int) -> tuple[int, int, int]:
    """(BLOCK, chunk, number of chunks) for channels of S elements."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(S)))
    chunk = block * min(MAX_ITERS, triton.cdiv(max(S, 1), block))
    if triton.cdiv(S, chunk) > MAX_CHUNKS:
        chunk = triton.cdiv(triton.cdiv(S, MAX_CHUNKS), block) * block
    return block, chunk, triton.cdiv(S, chunk)


def _partials_block(n_chunks: int) -> int:
    return min(MAX_PARTIALS, max(16, triton.next_power_of_2(n_chunks)))


def _params(t, dtype):
    """An optional small parameter in the arithmetic dtype, contiguous."""
    return t.to(dtype).contiguous() if t is not None else None


def _statistics(x, skip, average, add, weight, bias, groups, eps, mean, rstd):
    """The forward's first two kernels, on a non-empty contiguous x: chunk sums (writing the
    average when there is a skip), then per group mean and rstd into mean and rstd and the
    per-channel constants of y = silu(a * scale + shift). Returns the constants (B * C, 2) and
    the chunking, for the apply kernel. group_norm_silu_stats runs these alone."""
    acc = opmath_dtype(x.dtype)
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    add_, w_, b_ = _params(add, acc), _params(weight, acc), _params(bias, acc)
    block, chunk, n_chunks = _chunking(S)
    partials = torch.empty((B * C, n_chunks, 2), dtype=acc, device=x.device)
    coef = torch.empty((B * C, 2), dtype=acc, device=x.device)
    dummy = partials  # stands for absent optional tensors; never read
    has_skip = skip is not None
    _stats_kernel[(B * C, n_chunks)](
        x, skip if has_skip else x, average if has_skip else x, partials, S, chunk, n_chunks,
        HAS_SKIP=has_skip, BLOCK=block)
    _group_stats_kernel[(B * groups,)](
        x, skip if has_skip else x, partials, add_ if add is not None else dummy,
        w_ if weight is not None else dummy, b_ if bias is not None else dummy, mean, rstd, coef,
        S, C, C // groups, n_chunks, eps,
        HAS_SKIP=has_skip, HAS_ADD=add is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_P=_partials_block(n_chunks))
    return coef, (block, chunk, n_chunks)


@triton_op("group_norm_silu_forward")
def group_norm_silu_forward(x, skip, add, weight, bias, groups, eps):
    check_arguments("patchddm_triton::group_norm_silu_forward", x, skip, add, weight, bias, groups, eps,
                    kernel_layout=True)
    y, average, mean, rstd = fake_forward(x, skip, add, weight, bias, groups, eps)
    if x.numel() == 0:
        return (y, average) + empty_stats(mean, rstd, eps)
    coef, (block, chunk, n_chunks) = _statistics(x, skip, average, add, weight, bias, groups, eps, mean, rstd)
    B, C = x.shape[:2]
    _apply_kernel[(B * C, n_chunks)](average if skip is not None else x, coef, y, x[0, 0].numel(), chunk,
                                     BLOCK=block)
    return y, average, mean, rstd


@triton_op("group_norm_silu_stats")
def group_norm_silu_stats(x, add, groups, eps):
    check_stats_arguments("patchddm_triton::group_norm_silu_stats", x, add, groups, eps, kernel_layout=True)
    mean, rstd = fake_stats(x, add, groups, eps)
    if x.numel() == 0:
        return empty_stats(mean, rstd, eps)
    _statistics(x, None, None, add, None, None, groups, eps, mean, rstd)
    return mean, rstd


@triton_op("group_norm_silu_backward")
def group_norm_silu_backward(grad_out, grad_average, input, add, weight, bias, mean, rstd, groups, input_scale):
    check_backward_arguments("patchddm_triton::group_norm_silu_backward", grad_out, grad_average, input, add,
                             weight, bias, mean, rstd, groups)
    acc = opmath_dtype(input.dtype)
    B, C = input.shape[:2]
    grad_input, grad_add, grad_weight, grad_bias = fake_backward(
        grad_out, grad_average, input, add, weight, bias, mean, rstd, groups, input_scale)
    if input.numel() == 0:
        for t in (grad_add, grad_weight, grad_bias):
            t.zero_()
        return grad_input, grad_add, grad_weight, grad_bias
    S = input[0, 0].numel()
    add_, w_, b_ = _params(add, acc), _params(weight, acc), _params(bias, acc)
    block, chunk, n_chunks = _chunking(S)
    partials = torch.empty((B * C, n_chunks, 3), dtype=acc, device=input.device)
    channel = torch.empty((B * C, 3), dtype=acc, device=input.device)
    coef = torch.empty((B * C, 3), dtype=acc, device=input.device)
    dummy = partials
    flags = dict(HAS_ADD=add is not None, HAS_W=weight is not None, HAS_B=bias is not None)
    params = (add_ if add is not None else dummy, w_ if weight is not None else dummy,
              b_ if bias is not None else dummy)
    Cg = C // groups
    _grad_stats_kernel[(B * C, n_chunks)](
        grad_out, input, *params, mean, rstd, partials, S, C, Cg, chunk, n_chunks, **flags, BLOCK=block)
    _group_grad_kernel[(B * groups,)](
        partials, params[1], rstd, channel, coef, grad_add if add is not None else dummy, S, C, Cg, n_chunks,
        HAS_ADD=add is not None, HAS_W=weight is not None,
        BLOCK_P=_partials_block(n_chunks))
    _grad_apply_kernel[(B * C, n_chunks)](
        grad_out, input, grad_average if grad_average is not None else input, *params, mean, rstd, coef,
        grad_input, S, C, Cg, chunk, input_scale, HAS_GRAD_AVG=grad_average is not None, **flags, BLOCK=block)
    per_channel = channel.view(B, C, 3)
    if weight is not None:
        grad_weight.copy_(per_channel[..., 1].sum(0))
    if bias is not None:
        grad_bias.copy_(per_channel[..., 0].sum(0))
    return grad_input, grad_add, grad_weight, grad_bias


def _apply_into(x, mean, rstd, add, weight, bias, out):
    if x.numel() == 0:
        return
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    rows = apply_layout(x) != torch.contiguous_format
    scale, shift = apply_constants(mean, rstd, add, weight, bias, C)
    coef = torch.stack((scale, shift), dim=-1).contiguous()  # (B, C, 2)
    n = S * C if rows else S
    block, chunk, n_chunks = _chunking(n)
    _apply_given_kernel[(B if rows else B * C, n_chunks)](
        x, coef, out, n, C, chunk, x.stride(0), x.stride(1), out.stride(0), out.stride(1), ROWS=rows, BLOCK=block)


@triton_op("group_norm_silu_apply")
def group_norm_silu_apply(x, mean, rstd, add, weight, bias, groups):
    check_apply_arguments("patchddm_triton::group_norm_silu_apply", x, mean, rstd, add, weight, bias, groups,
                          kernel_layout=True)
    out = fake_apply(x, mean, rstd, add, weight, bias, groups)
    _apply_into(x, mean, rstd, add, weight, bias, out)
    return out


@triton_op("group_norm_silu_apply_out")
def group_norm_silu_apply_out(x, mean, rstd, add, weight, bias, groups, out):
    check_apply_arguments("patchddm_triton::group_norm_silu_apply_out", x, mean, rstd, add, weight, bias, groups,
                          out, kernel_layout=True)
    _apply_into(x, mean, rstd, add, weight, bias, out)


group_norm_silu_forward.register_fake(fake_forward)
group_norm_silu_backward.register_fake(fake_backward)
group_norm_silu_apply.register_fake(fake_apply)
group_norm_silu_stats.register_fake(fake_stats)
register_autograd("patchddm_triton::group_norm_silu_forward", torch.ops.patchddm_triton.group_norm_silu_backward)
