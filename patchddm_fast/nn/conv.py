"""The fused U-Net's 3x3x3 convolution: nn.Conv3d whose CPU training step takes its
convolutions from patchddm's kernels where those are faster than oneDNN's.

Two kernels of ours (AMD EPYC Zen 4, 2 threads, channels_last_3d; benchmarks/conv_kernels.py):
- ops/conv3d_winograd.py, Winograd's F(2x2x2, 3x3x3), for the forward and the input gradient:
  8 products per output instead of 27. In bfloat16 (CPUs with AVX512-BF16, where oneDNN runs
  at the dot-product rate): 1.65x at 29 channels 64^3, 2.0x at 87 channels 32^3, 1.3x-1.5x at
  116 channels 16^3, used from 24 channels into the convolution and 16 x 16 planes. In float32
  (any AVX-512 CPU, where oneDNN runs at about two thirds of the FMA rate): 2.1x, 2.5x and
  2.0x there, used from 16 channels and 16 x 16 planes.
- ops/conv3d_weight_grad.py for the bfloat16 weight gradient, which oneDNN computes at about
  half its forward's speed without AMX (1.60x at 29 channels 64^3, 1.09x at 87 channels 32^3,
  0.92x at 116 channels 16^3): used on planes of at least 32 x 32.
On AMX CPUs oneDNN's kernels are different ones that we have not measured against, so they
keep them; so do evaluation mode (sampling) and every other geometry.

Ours returns float32 weight gradients (oneDNN rounds bfloat16 ones to bfloat16 before autograd
casts them back to the float32 weights). Winograd's bfloat16 outputs carry about three times
the rounding error of a direct bfloat16 convolution, its float32 ones float32 rounding
(ops/conv3d_winograd.py). The parameters, their names and the plain nn.Conv3d behaviour
elsewhere are unchanged.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ..fast_settings import cpu_flags
from ..ops import conv3d_weight_grad, conv3d_winograd, conv3d_winograd_input_grad
from ..ops.conv3d_weight_grad import kernel_available as weight_grad_available
from ..ops.conv3d_winograd import kernel_available as winograd_available
from ..ops.group_norm_silu import memory_format

# Smallest plane (height x width) where our weight gradient was faster (32 x 32: 1.09x; 16 x 16: 0.92x).
MIN_PLANE = 32 * 32
# Where Winograd was faster (benchmarks/conv_kernels.py and the same on other shapes), 2 threads:
# planes of 16 x 16 (bf16 116 channels 1.41x, 8 x 8 0.34x; float32 1.98x and 1.12x, but 32
# channels at 8 x 8 0.46x); channels into the convolution, bfloat16: 24 -> 24 at 64^3 1.42x,
# 16 -> 16 1.68x at 4 x 32^3 but 0.87x at 64^3, 12 -> 12 1.00x, 8 -> 29 0.71x; float32:
# 16 -> 16 at 64^3 1.42x and at 4 x 16^3 1.09x, 8 -> 8 0.90x-1.02x, 4 -> 8 0.76x.
WINOGRAD_MIN_PLANE = 16 * 16
WINOGRAD_MIN_CHANNELS = {torch.bfloat16: 24, torch.float32: 16}

CHOICES = ("auto", "onednn")


def _choice_from_environment() -> str:
    """PATCHDDM_CPU_CONV: "auto" (the default) or "onednn" (none of our convolution kernels,
    e.g. to compare a run with Winograd's rounding against one without); others are ignored."""
    value = os.environ.get("PATCHDDM_CPU_CONV", "").strip().lower()
    if value and value not in CHOICES:
        warnings.warn(f"PATCHDDM_CPU_CONV={value!r} ignored: choose one of {', '.join(CHOICES)}", stacklevel=2)
        return "auto"
    return value or "auto"


# "auto" (ours where it is faster, as above), "onednn" (never ours): read from the environment
# at import, and set by the benchmarks to compare both.
weight_grad_choice = winograd_choice = _choice_from_environment()


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype aten.convolution computes x * weight in: autocast's, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _cpu_3x3x3(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether conv of x is the geometry our kernels compute: a CPU 3x3x3 convolution with
    stride 1, padding 1 and one group, in this module class."""
    return (isinstance(conv, Conv3d) and x.device.type == "cpu" and x.dim() == 5
            and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _has_amx() -> bool:
    # There oneDNN has other kernels, which we have not measured against: ours stay off.
    return "amx_bf16" in cpu_flags()


def _chosen(choice: str, available: bool) -> bool:
    return choice == "auto" and available and not _has_amx()


def uses_weight_grad_kernel(conv: nn.Conv3d, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether conv's weight gradient for input x (computed in dtype) comes from our kernel."""
    return (dtype == torch.bfloat16 and _cpu_3x3x3(conv, x) and x.shape[-2] * x.shape[-1] >= MIN_PLANE
            and weight_grad_kernel_chosen())


def uses_winograd(conv: nn.Conv3d, x: torch.Tensor, dtype: torch.dtype, channels: int | None = None) -> bool:
    """Whether a convolution of x through conv's geometry runs as our Winograd kernel in dtype:
    its forward of x, or its input gradient when x is the output gradient. channels: those
    going into the convolution when not x's (the input gradient's, before grad_out exists)."""
    channels = x.shape[1] if channels is None else channels
    return (dtype in WINOGRAD_MIN_CHANNELS and _cpu_3x3x3(conv, x) and channels >= WINOGRAD_MIN_CHANNELS[dtype]
            and x.shape[-2] * x.shape[-1] >= WINOGRAD_MIN_PLANE and winograd_chosen(dtype))


def weight_grad_kernel_chosen() -> bool:
    """Whether this CPU's bfloat16 training takes weight gradients from our kernel (where the
    shapes allow): it runs here (AVX512-BF16), there is no AMX, and no one chose oneDNN."""
    return _chosen(weight_grad_choice, weight_grad_available())


def winograd_chosen(dtype: torch.dtype) -> bool:
    """The same for the forward and input gradient by Winograd in dtype (AVX512-BF16 for
    bfloat16, AVX-512 for float32)."""
    return _chosen(winograd_choice, winograd_available(dtype))


def conv_status() -> str:
    """One line for `patchddm info`: where this CPU's training takes its 3x3x3 convolutions."""
    def one(choice: str, available: bool, ours: str) -> str:
        if choice != "auto":
            return f"oneDNN (chosen: {choice!r}, e.g. by PATCHDDM_CPU_CONV)"
        if not available:
            return "oneDNN (no AVX-512 or AVX512-BF16 here, or the extension is not built)"
        if _has_amx():
            return "oneDNN (this CPU has AMX, where oneDNN has its own fast kernels)"
        return ours

    def winograd(dtype: torch.dtype) -> str:
        return one(winograd_choice, winograd_available(dtype),
                   f"patchddm's Winograd kernel from {WINOGRAD_MIN_CHANNELS[dtype]} channels and "
                   f"{WINOGRAD_MIN_PLANE}-voxel planes, oneDNN below")
    return (f"float32 forward and input gradient: {winograd(torch.float32)}; bfloat16 forward and input "
            f"gradient: {winograd(torch.bfloat16)}; bfloat16 weight gradient: "
            + one(weight_grad_choice, weight_grad_available(),
                  f"patchddm's kernel from {MIN_PLANE}-voxel planes, oneDNN below"))


def conv3d_backward(conv: nn.Conv3d, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    needs: tuple[bool, bool, bool]):
    """(grad_x, grad_weight, grad_bias) of conv(x) with `weight` (both in the compute dtype),
    None where `needs` says no: aten.convolution_backward, with our kernels where
    uses_winograd (the input gradient) and uses_weight_grad_kernel (the weight and bias
    gradients, then float32) say so."""
    need_x, need_weight, need_bias = needs
    ours_x = need_x and uses_winograd(conv, grad_out, x.dtype)
    ours_weight = need_weight and uses_weight_grad_kernel(conv, x, x.dtype)
    mask = [need_x and not ours_x, need_weight and not ours_weight, need_bias and not ours_weight]
    grads = [None, None, None]
    if any(mask):
        grads = list(torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if mask[2] else None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0] * 3, conv.groups, mask))
    if ours_x:
        grads[0] = conv3d_winograd_input_grad(grad_out, weight)
    if ours_weight:
        grads[1], grad_bias = conv3d_weight_grad(x, grad_out)
        grads[2] = grad_bias if need_bias else None
    return tuple(grads)


class _Conv3dOurs(torch.autograd.Function):
    """conv(x) computed in `dtype` from the parameters, as autocast (or plain float32) would
    compute it, by Winograd where uses_winograd says so; backward through conv3d_backward,
    returning the parameters' gradients in their dtype."""

    @staticmethod
    def forward(ctx, conv, dtype, x, weight, bias):
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        if uses_winograd(conv, xc, dtype):
            out = conv3d_winograd(xc, wc, bc)
        else:
            out = torch.ops.aten.convolution(xc, wc, bc, list(conv.stride), list(conv.padding), list(conv.dilation),
                                             False, [0] * 3, conv.groups)
        ctx.conv, ctx.x_dtype, ctx.has_bias = conv, x.dtype, bias is not None
        ctx.save_for_backward(xc, wc)  # what autocast's convolution would keep
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        _, _, need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = conv3d_backward(ctx.conv, grad_out, xc, wc,
                                                         (need_x, need_weight, need_bias and ctx.has_bias))
        weight = ctx.conv.weight
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype).contiguous(memory_format=memory_format(weight))
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.conv.bias.dtype)
        return None, None, grad_x.to(ctx.x_dtype) if grad_x is not None else None, grad_weight, grad_bias


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state_dict keys) that, when training on a CPU where it
    pays, computes its convolutions with our kernels (uses_winograd, uses_weight_grad_kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training, not grad mode: the "cheap" recomputation runs its forward under no_grad.
        if self.training and self.weight.requires_grad:
            dtype = compute_dtype(x, self.weight)
            if (uses_weight_grad_kernel(self, x, dtype) or uses_winograd(self, x, dtype)
                    or uses_winograd(self, x, dtype, channels=self.out_channels)):  # the input gradient
                return _Conv3dOurs.apply(self, dtype, x, self.weight, self.bias)
        return super().forward(x)
