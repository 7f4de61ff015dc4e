"""GroupNorm + SiLU, with the timestep bias and the averaging skip fused in; and its second
pass alone with given statistics (group_norm_silu_apply, below), and its first pass alone, the
statistics (group_norm_silu_stats).

    average = (x + skip) / 2                      (only when skip is given)
    u       = (average or x) + add[b, c]          (only when add is given)
    y       = silu(group_norm(u, groups) * weight[c] + bias[c])

This is the normalisation at the head of every ResBlock branch of PatchDDM's U-Net: `add`
carries the timestep embedding, `skip` the encoder features that the decoder averages in. The
fused op makes one pass forward and two backward, keeps the statistics in float32, and saves
only its input (the average when there is a skip, which the ResBlock's residual path holds
anyway) and per-group mean and rstd, recomputing the rest in backward. The unfused sequence
saves the normalised tensor and the SiLU output on top.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn.functional as F

from .._extension import EXTENSION
from ._backends import FastOp
from ._checks import check_contiguous, check_like, check_tensor, opmath_dtype

OP = FastOp("group_norm_silu", native="group_norm_silu_forward")
NAME = "group_norm_silu"
# No CUDA kernel: the CUDA forward's apply kernel reads packed (B, C, S) tensors only, not slabs.
APPLY_OP = FastOp("group_norm_silu_apply", native="group_norm_silu_apply", cuda_order=("triton", "torch"),
                  module="group_norm_silu")
APPLY_NAME = "group_norm_silu_apply"
# No CUDA kernel either: the CUDA forward's statistics kernels are fused with its apply pass.
STATS_OP = FastOp("group_norm_silu_stats", native="group_norm_silu_stats", cuda_order=("triton", "torch"),
                  module="group_norm_silu")
STATS_NAME = "group_norm_silu_stats"


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                              eps: float = 1e-5, add: torch.Tensor | None = None, skip: torch.Tensor | None = None
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch group_norm_silu: the test oracle and the fallback (same arguments)."""
    acc = opmath_dtype(x.dtype)
    average = None
    u = x.to(acc)
    if skip is not None:
        # The stored average, rounded to x's dtype, is what the rest sees, as in the kernels.
        average = ((u + skip.to(acc)) * 0.5).to(x.dtype)
        u = average.to(acc)
    if add is not None:
        u = u + add.to(acc).reshape(add.shape + (1,) * (x.dim() - 2))
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    y = F.silu(F.group_norm(u, groups, w, b, eps)).to(x.dtype)
    return (average, y) if skip is not None else y


def as_groups(name: str, groups) -> int:
    """groups as a Python int: any integer type (int, numpy.int64, a 0-d integer tensor) is
    accepted through operator.index; bools and non-integers are refused."""
    if isinstance(groups, bool):
        raise TypeError(f"{name}: groups must be an integer, got {groups!r}")
    try:
        return operator.index(groups)
    except TypeError:
        raise TypeError(f"{name}: groups must be an integer, got {type(groups).__name__} {groups!r}") from None


def check_arguments(name: str, x: torch.Tensor, skip: torch.Tensor | None, add: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float, *,
                    kernel_layout: bool = False) -> None:
    """The checks of every group_norm_silu_forward backend (csrc/group_norm_silu_args.h makes
    the same for the C++ and CUDA kernels); kernel_layout: x and skip contiguous, as the
    kernels read them (the public op makes them so itself)."""
    check_tensor(name, "x", x, min_ndim=3)
    batch, channels = x.shape[:2]
    groups = as_groups(name, groups)
    if groups <= 0 or channels % groups:
        raise ValueError(f"{name}: groups={groups} must be a positive divisor of the {channels} "
                         f"channels of x (shape {tuple(x.shape)})")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0 and math.isfinite(eps)):
        # inf would normalise everything to 0, nan everything to nan: neither is a GroupNorm
        raise ValueError(f"{name}: eps must be positive and finite, got {eps!r}")
    if skip is not None:
        check_like(name, "skip", skip, x, "x")
    for label, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, label, param, ndim=1)
            check_like(name, label, param, x, "x", shape=False, dtype=False)
            if param.shape[0] != channels:
                raise ValueError(f"{name}: {label} has shape {tuple(param.shape)}, expected ({channels},)")
    if add is not None:
        check_tensor(name, "add", add, ndim=2)
        check_like(name, "add", add, x, "x", shape=False, dtype=False)
        if tuple(add.shape) != (batch, channels):
            raise ValueError(f"{name}: add has shape {tuple(add.shape)}, expected (batch, channels) = "
                             f"({batch}, {channels})")
    if kernel_layout:
        check_contiguous(name, x=x, skip=skip)


def check_backward_arguments(name: str, grad_out: torch.Tensor, grad_average: torch.Tensor | None,
                             input: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, groups: int) -> None:
    """The checks of every group_norm_silu_backward backend, in the kernels' layout."""
    check_arguments(name, input, None, add, weight, bias, groups, 1.0, kernel_layout=True)
    check_like(name, "grad_out", grad_out, input, "input")
    if grad_average is not None:
        check_like(name, "grad_average", grad_average, input, "input")
    check_contiguous(name, grad_out=grad_out, grad_average=grad_average, mean=mean, rstd=rstd)
    acc = opmath_dtype(input.dtype)
    batch = input.shape[0]
    for label, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != (batch, groups) or t.dtype != acc or t.device != input.device:
            raise ValueError(f"{name}: {label} must be a ({batch}, {groups}) {acc} tensor on {input.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float = 1e-5, add: torch.Tensor | None = None, skip: torch.Tensor | None = None, *,
                    backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused silu(group_norm((x [+ skip] / 2) + add)).

    x: (B, C, *spatial), float32, float16, bfloat16 or float64.
    weight, bias: (C,) affine parameters of the norm, or None (any float dtype).
    groups: number of groups, dividing C. eps: added to the variance (1e-5 as PatchDDM).
    add: (B, C) per-(batch, channel) bias added before normalising (the timestep embedding).
    skip: a tensor like x, averaged with it first: the decoder's (h + skip) / 2.

    Returns y, like x; or (average, y) when skip is given, average = (x + skip) / 2 in x's
    dtype (the ResBlock's residual path needs it). Both in x's memory format (channels_last_3d
    for a channels_last_3d x, as F.group_norm), the gradients of x and skip in theirs.
    Statistics are float32 (float64 for float64 inputs). Differentiable in x, skip, add,
    weight and bias.

    Layouts: the compiled CPU kernel computes on channels-last (channels_last / _3d) tensors as
    they are, with no copies (a skip in another layout than x is copied to x's). The CUDA and
    Triton kernels read contiguous tensors only, and the plain-PyTorch backend stays the
    contiguous reference: those copy a channels-last x (and skip) to contiguous, the outputs
    back, and their gradients likewise.
    """
    check_arguments(NAME, x, skip, add, weight, bias, groups, eps)
    groups, eps = operator.index(groups), float(eps)
    choice = OP.resolve(x.device, backend)
    layout = memory_format(x)
    if layout != torch.contiguous_format and choice == "cpp" and x.device.type == "cpu":
        # The CPU kernel reads channels-last tensors natively: outputs and gradients come back
        # in x's layout without copies; only a skip laid out otherwise is made like x.
        skip = to_layout(skip, layout) if skip is not None else None
        y, average, _, _ = torch.ops.patchddm.group_norm_silu_forward(x, skip, add, weight, bias, groups, eps)
        return (average, y) if skip is not None else y
    # The other backends compute in the contiguous layout, which their kernels read: a
    # channels-last x (or skip) is copied there, the outputs back, and their gradients too.
    x, skip = to_contiguous(x), to_contiguous(skip) if skip is not None else None
    if choice == "torch":
        outputs = group_norm_silu_reference(x, weight, bias, groups, eps, add, skip)
    else:
        ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
        contiguous = [t.contiguous() if t is not None else None for t in (x, skip, add, weight, bias)]
        y, average, _, _ = ops.group_norm_silu_forward(*contiguous, groups, float(eps))
        outputs = (average, y) if skip is not None else y
    if isinstance(outputs, tuple):
        return tuple(t.contiguous(memory_format=layout) for t in outputs)
    return outputs.contiguous(memory_format=layout)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for a 4-D (5-D) tensor laid out so, else contiguous_format (which
    also wins where both fit, as with one channel)."""
    channels_last = _CHANNELS_LAST.get(t.dim())
    if channels_last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


class _Relayout(torch.autograd.Function):
    """t.contiguous(memory_format=target), whose gradient comes back in t's own memory format
    (a plain .contiguous() hands back the gradient of its copy, in the copy's layout)."""

    @staticmethod
    def forward(t, target, layout):
        return t.contiguous(memory_format=target)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layout = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout), None, None


def to_layout(t: torch.Tensor, target: torch.memory_format) -> torch.Tensor:
    """t laid out as `target` (t itself when it already is), its gradient in t's layout."""
    return t if t.is_contiguous(memory_format=target) else _Relayout.apply(t, target, memory_format(t))


def to_contiguous(t: torch.Tensor) -> torch.Tensor:
    layout = memory_format(t)
    return t if layout == torch.contiguous_format else _Relayout.apply(t, torch.contiguous_format, layout)


# -- the normalisation alone, with given statistics -----------------------------------------------

def _packed_from(t: torch.Tensor, first: int, inner: int) -> bool:
    """Whether dimensions first.. of t are packed row-major, the innermost with stride `inner`
    (dimensions of size 1 may have any stride)."""
    expected = inner
    for size, stride in zip(reversed(t.shape[first:]), reversed(t.stride()[first:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def fits_apply_layout(t: torch.Tensor, layout: torch.memory_format) -> bool:
    """Whether group_norm_silu_apply's kernels read (or write) t as `layout`: contiguous_format,
    each (b, c) one packed run of the spatial elements at any batch and channel strides (a
    contiguous tensor, or a depth slab t[:, :, d0:d1] of one); channels_last(_3d), each batch
    entry one packed run of rows of C channels at any batch stride (a channels-last tensor, or
    a depth slab of one). As apply_layout_as in csrc/group_norm_silu_args.h."""
    if layout == torch.contiguous_format:
        return _packed_from(t, 2, 1)
    return (t.shape[1] == 1 or t.stride(1) == 1) and _packed_from(t, 2, t.shape[1])


def apply_layout(t: torch.Tensor) -> torch.memory_format | None:
    """The layout in which group_norm_silu_apply reads t: contiguous_format where it fits, else
    channels_last(_3d) for a 4-D (5-D) t that fits it, else None (t must be copied first)."""
    if fits_apply_layout(t, torch.contiguous_format):
        return torch.contiguous_format
    channels_last = _CHANNELS_LAST.get(t.dim())
    return channels_last if channels_last is not None and fits_apply_layout(t, channels_last) else None


def apply_constants(mean: torch.Tensor, rstd: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (B, C) in mean's dtype, of y = silu(x * scale + shift): scale = rstd w,
    shift = (add - mean) scale + bias, in float64 from weight and bias rounded to mean's dtype,
    as the CPU kernel computes them (group_constants in csrc/cpu/group_norm_silu.cpp)."""
    acc = mean.dtype
    per_group = channels // mean.shape[1]
    r = rstd.double().repeat_interleave(per_group, dim=1)
    m = mean.double().repeat_interleave(per_group, dim=1)
    scale = r * weight.to(acc).double() if weight is not None else r
    centred = add.double() - m if add is not None else -m
    shift = centred * scale
    if bias is not None:
        shift = shift + bias.to(acc).double()
    return scale.to(acc), shift.to(acc)


def group_norm_silu_apply_reference(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                    add: torch.Tensor | None, weight: torch.Tensor | None,
                                    bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Plain-PyTorch group_norm_silu_apply (same arguments but out): the test oracle and the
    fallback; the result in x's layout as the kernels give it."""
    scale, shift = apply_constants(mean, rstd, add, weight, bias, x.shape[1])
    shape = scale.shape + (1,) * (x.dim() - 2)
    y = F.silu(torch.addcmul(shift.reshape(shape), x.to(mean.dtype), scale.reshape(shape))).to(x.dtype)
    return y.contiguous(memory_format=apply_layout(x) or torch.contiguous_format)


def refuse_grad(name: str, **tensors: torch.Tensor | None) -> None:
    """For the ops without autograd: an error, while grad mode is on, naming the first tensor
    that requires grad (the compiled ops' Autograd kernel, without_autograd in
    csrc/cpu/group_norm_silu_autograd.cpp, refuses the same)."""
    if torch.is_grad_enabled():
        for label, t in tensors.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(f"{name} is not differentiable: {label} requires grad; call it under "
                                   f"torch.no_grad() (or pass detached tensors)")


def check_apply_arguments(name: str, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          add: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          groups: int, out: torch.Tensor | None = None, *, kernel_layout: bool = False) -> None:
    """The checks of every group_norm_silu_apply backend (check_group_norm_silu_apply in
    csrc/group_norm_silu_args.h makes the same for the C++ kernel); kernel_layout: x, out, mean
    and rstd laid out as the kernels read them (the public op makes them so itself). Refuses
    inputs that require grad while grad mode is on: the op has no autograd."""
    check_arguments(name, x, None, add, weight, bias, groups, 1.0)
    groups = as_groups(name, groups)
    batch = x.shape[0]
    acc = opmath_dtype(x.dtype)
    for label, t in (("mean", mean), ("rstd", rstd)):
        check_tensor(name, label, t, dtypes=None)
        if t.shape != (batch, groups) or t.dtype != acc or t.device != x.device:
            raise ValueError(f"{name}: {label} must be a ({batch}, {groups}) {acc} tensor on {x.device} "
                             f"(as group_norm_silu_forward returns it), got {tuple(t.shape)} {t.dtype} on {t.device}")
    if out is not None:
        check_like(name, "out", out, x, "x")
    refuse_grad(name, x=x, mean=mean, rstd=rstd, add=add, weight=weight, bias=bias)
    if kernel_layout:
        layout = apply_layout(x)
        if layout is None:
            raise ValueError(f"{name}: x must be contiguous or channels-last (4-D or 5-D), or a depth slab "
                             f"x[:, :, d0:d1] of either; got shape {tuple(x.shape)} and strides {x.stride()}")
        if out is not None and not fits_apply_layout(out, layout):
            raise ValueError(f"{name}: out must be laid out as x, {layout} (or a depth slab of such a tensor); "
                             f"got strides {out.stride()}")
        check_contiguous(name, mean=mean, rstd=rstd)


def group_norm_silu_apply(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, add: torch.Tensor | None,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                          out: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """GroupNorm + SiLU with the statistics given: group_norm_silu's normalisation pass alone.

        y = silu((x + add[b, c] - mean[b, g]) * rstd[b, g] * weight[c] + bias[c]),  g = c // (C / groups)

    computed as the forward computes it, y = silu(x * A[b, c] + B[b, c]) with A = rstd * weight
    and B = (add - mean) * A + bias in float64, rounded to float32 (float64 for float64 x).
    Given group_norm_silu_forward's own mean and rstd, the CPU kernel gives its y bit for bit.
    For the slab forward: statistics gathered over a whole tensor, applied to a few depth planes.

    x: (B, C, *spatial), float32, float16, bfloat16 or float64: contiguous, channels-last
        (channels_last / channels_last_3d), or a depth slab t[:, :, d0:d1] of either, all read
        in place; other strides are copied to contiguous first.
    mean, rstd: (B, groups) float32 (float64 for float64 x), as torch.ops.patchddm.
        group_norm_silu_forward returns them. add: (B, C) or None; weight, bias: (C,) or None
        (any float dtype).
    out: a tensor of x's shape and dtype to write y into (it may be a depth slab of a larger
        contiguous or channels-last buffer, written in place when laid out as x; the other
        planes are left alone), returned; without it, a new tensor in x's layout (contiguous or
        channels-last).

    Not differentiable (an inference helper): refuses, with an error, inputs that require grad
    while grad mode is on. No CUDA kernel: CUDA tensors run on Triton, else on PyTorch.
    """
    check_apply_arguments(APPLY_NAME, x, mean, rstd, add, weight, bias, groups, out)
    groups = operator.index(groups)
    choice = APPLY_OP.resolve(x.device, backend)
    if choice == "torch":
        y = group_norm_silu_apply_reference(x, mean, rstd, add, weight, bias, groups)
        return y if out is None else out.copy_(y)
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    layout = apply_layout(x)
    if layout is None:
        x, layout = x.contiguous(), torch.contiguous_format
    mean, rstd = mean.contiguous(), rstd.contiguous()
    if out is None:
        return ops.group_norm_silu_apply(x, mean, rstd, add, weight, bias, groups)
    if fits_apply_layout(out, layout):
        ops.group_norm_silu_apply_out(x, mean, rstd, add, weight, bias, groups, out)
        return out
    # out laid out otherwise than x: through a temporary
    return out.copy_(ops.group_norm_silu_apply(x, mean, rstd, add, weight, bias, groups))


# -- the statistics alone -------------------------------------------------------------------------

def empty_stats(mean: torch.Tensor, rstd: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of an empty x, as every backend gives them: mean 0, rstd 1 / sqrt(eps)."""
    return mean.zero_(), rstd.fill_(1 / math.sqrt(eps))


def group_norm_silu_stats_reference(x: torch.Tensor, add: torch.Tensor | None, groups: int,
                                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch group_norm_silu_stats (same arguments): the test oracle and the fallback.
    var_mean in float32 (float64 for float64 x) of u = x + add minus each group's first value
    of x, so that a large mean does not swamp a small spread (x - shift is exact where x is
    near it; x + add rounded at |x| ~ 1000 would not be); the mean and rstd in float64 from it."""
    acc = opmath_dtype(x.dtype)
    batch, channels = x.shape[:2]
    if x.numel() == 0:
        return empty_stats(x.new_empty((batch, groups), dtype=acc), x.new_empty((batch, groups), dtype=acc), eps)
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)
    shift = x.flatten(2)[:, ::channels // groups, 0].to(acc)  # (B, G)
    u = x.to(acc) - shift.repeat_interleave(channels // groups, dim=1).reshape(per_channel)
    if add is not None:
        u = u + add.to(acc).reshape(per_channel)
    var, mean = torch.var_mean(u.reshape(batch, groups, -1), dim=2, correction=0)
    return (mean.double() + shift.double()).to(acc), (var.double() + eps).rsqrt().to(acc)


def check_stats_arguments(name: str, x: torch.Tensor, add: torch.Tensor | None, groups: int, eps: float, *,
                          kernel_layout: bool = False) -> None:
    """The checks of every group_norm_silu_stats backend (check_group_norm_silu_stats in
    csrc/group_norm_silu_args.h makes the same for the C++ kernel): the forward's, without skip,
    weight and bias; kernel_layout: x contiguous, as the Triton kernels read it. Refuses inputs
    that require grad while grad mode is on: the op has no autograd."""
    check_arguments(name, x, None, add, None, None, groups, eps, kernel_layout=kernel_layout)
    refuse_grad(name, x=x, add=add)


def group_norm_silu_stats(x: torch.Tensor, add: torch.Tensor | None, groups: int, eps: float = 1e-5, *,
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm statistics of x + add: group_norm_silu's first pass alone.

        u = x + add[b, c],  mean[b, g] = E[u],  rstd[b, g] = 1 / sqrt(E[(u - mean)^2] + eps)

    over the C / groups channels of group g and every spatial element. Returns (mean, rstd),
    (B, groups) float32 (float64 for float64 x): on the CPU the same bits as
    torch.ops.patchddm.group_norm_silu_forward(x, None, add, weight, bias, groups, eps) returns
    for its mean and rstd (the same code: per-channel sums shifted by the channel's first value,
    float lanes within tiles, double across them, merged per group in double), so
    group_norm_silu_apply(x, mean, rstd, add, weight, bias, groups) then gives that forward's y
    bit for bit. For the slab forward: a whole tensor's statistics, then each slab applied.

    x: (B, C, *spatial), float32, float16, bfloat16 or float64: contiguous or channels-last
        (channels_last / channels_last_3d), read in place on the CPU; other strides are copied
        to contiguous first (and channels-last too on the Triton and PyTorch backends).
    add: (B, C) or None (any float dtype). eps: added to the variance (1e-5 as PatchDDM).

    Not differentiable (an inference helper): refuses, with an error, inputs that require grad
    while grad mode is on. No CUDA kernel: CUDA tensors run the Triton forward's statistics
    kernels, else PyTorch (group_norm_silu_stats_reference).
    """
    check_stats_arguments(STATS_NAME, x, add, groups, eps)
    groups, eps = operator.index(groups), float(eps)
    choice = STATS_OP.resolve(x.device, backend)
    if choice == "torch":
        return group_norm_silu_stats_reference(x, add, groups, eps)
    if not (choice == "cpp" and memory_format(x) != torch.contiguous_format):
        x = x.contiguous()  # the CPU kernel reads channels-last x as it is; Triton contiguous only
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    return ops.group_norm_silu_stats(x, add, groups, eps)


# -- fake kernels and autograd, shared by the compiled and the Triton ops ---------------------

def fake_forward(x, skip, add, weight, bias, groups, eps):
    stats = x.new_empty((x.shape[0], groups), dtype=opmath_dtype(x.dtype))
    average = torch.empty_like(x) if skip is not None else x.new_empty((0,))
    return torch.empty_like(x), average, stats, torch.empty_like(stats)


def fake_backward(grad_out, grad_average, input, add, weight, bias, mean, rstd, groups, input_scale):
    acc = opmath_dtype(input.dtype)

    def like(param):  # a separate empty tensor per absent gradient: outputs must not alias
        return input.new_empty(param.shape if param is not None else (0,), dtype=acc)

    return torch.empty_like(input), like(add), like(weight), like(bias)


def fake_stats(x, add, groups, eps):
    stats = x.new_empty((x.shape[0], groups), dtype=opmath_dtype(x.dtype))
    return stats, torch.empty_like(stats)


def fake_apply(x, mean, rstd, add, weight, bias, groups):
    layout = apply_layout(x) or torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)


def fake_apply_out(x, mean, rstd, add, weight, bias, groups, out) -> None:
    return None


def register_autograd(forward_qualname: str, backward_op) -> None:
    """Autograd of a group_norm_silu_forward op, whose gradients come from backward_op (the
    Triton op's; csrc/cpu/group_norm_silu_autograd.cpp does the same for the compiled op)."""

    def setup_context(ctx, inputs, output):
        x, skip, add, weight, bias, groups, eps = inputs
        _, average, mean, rstd = output
        ctx.groups, ctx.has_skip = groups, skip is not None
        # An unused output (the average, often) then arrives as None, not as a tensor of zeros
        # that the backward would have to fill and read.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(average if skip is not None else x, add, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_out, grad_average, _grad_mean, _grad_rstd):
        input, add, weight, bias, mean, rstd = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(input)
        if not ctx.has_skip:
            grad_average = None
        scale = 0.5 if ctx.has_skip else 1.0
        grad_input, grad_add, grad_weight, grad_bias = backward_op(
            grad_out.contiguous(), grad_average.contiguous() if grad_average is not None else None,
            input, add, weight, bias, mean, rstd, ctx.groups, scale)
        return (grad_input,
                grad_input if ctx.has_skip else None,
                grad_add.to(add.dtype) if add is not None else None,
                grad_weight.to(weight.dtype) if weight is not None else None,
                grad_bias.to(bias.dtype) if bias is not None else None,
                None, None)

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)


if EXTENSION.loaded:
    torch.library.register_fake("patchddm::group_norm_silu_forward")(fake_forward)
    torch.library.register_fake("patchddm::group_norm_silu_backward")(fake_backward)
    torch.library.register_fake("patchddm::group_norm_silu_apply")(fake_apply)
    torch.library.register_fake("patchddm::group_norm_silu_stats")(fake_stats)
    torch.library.register_fake("patchddm::group_norm_silu_apply_out")(fake_apply_out)
    # The compiled op's autograd is registered in C++ (csrc/cpu/group_norm_silu_autograd.cpp:
    # the same as register_autograd, without the Python wrapper's cost on every call).
