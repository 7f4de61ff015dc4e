"""The fused U-Net's 3x3x3 convolution: nn.Conv3d whose bfloat16 CPU training step takes its
weight gradient from patchddm's kernel where that is faster than oneDNN's.

oneDNN computes a bfloat16 weight gradient on CPUs with AVX512-BF16 and no AMX at about half
the speed of the forward (ops/conv3d_weight_grad.py); ours is faster on planes of at least
32 x 32 and slower below (benchmarks/conv_weight_grad.py, AMD EPYC Zen 4, 2 threads: 1.60x at 29
channels 64^3, 1.09x at 87 channels 32^3, 0.92x at 116 channels 16^3), so it is used there only.
On AMX CPUs oneDNN's weight gradient is a different kernel that we have not measured against,
so they keep it. The forward and the input gradient are always oneDNN's (aten.convolution).

Ours returns float32 gradients (oneDNN rounds them to bfloat16 before autograd casts them back
to the float32 weights), so the training step also gets more precise weight gradients.
The parameters, their names and the plain nn.Conv3d behaviour elsewhere are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..fast_settings import cpu_flags
from ..ops import conv3d_weight_grad
from ..ops.conv3d_weight_grad import kernel_available
from ..ops.group_norm_silu import memory_format

# Smallest plane (height x width) where ours was faster (32 x 32: 1.09x; 16 x 16: 0.92x).
MIN_PLANE = 32 * 32

# "auto" (ours where it is faster, as above), "onednn" (never ours): benchmarks compare both.
weight_grad_choice = "auto"


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype aten.convolution computes x * weight in: autocast's, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def uses_weight_grad_kernel(conv: nn.Conv3d, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether conv's weight gradient for input x (computed in dtype) comes from our kernel."""
    return (isinstance(conv, Conv3d) and dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 5
            and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[-2] * x.shape[-1] >= MIN_PLANE
            and weight_grad_kernel_chosen())


def weight_grad_kernel_chosen() -> bool:
    """Whether this CPU's bfloat16 training takes weight gradients from our kernel (where the
    shapes allow): it runs here (AVX512-BF16), there is no AMX, and no one chose oneDNN."""
    return weight_grad_choice == "auto" and kernel_available() and "amx_bf16" not in cpu_flags()


def weight_grad_status() -> str:
    """One line for `patchddm info`: where this CPU's bfloat16 training takes weight gradients."""
    if weight_grad_choice != "auto":
        return f"oneDNN (weight_grad_choice={weight_grad_choice!r})"
    if not kernel_available():
        return "oneDNN (no AVX512-BF16 here, or the extension is not built)"
    if "amx_bf16" in cpu_flags():
        return "oneDNN (this CPU has AMX, where oneDNN has its own fast kernel)"
    return f"patchddm's kernel where a plane (height x width) has {MIN_PLANE} voxels or more, oneDNN below"


def conv3d_backward(conv: nn.Conv3d, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    needs: tuple[bool, bool, bool]):
    """(grad_x, grad_weight, grad_bias) of conv(x) with `weight` (both in the compute dtype),
    None where `needs` says no: aten.convolution_backward, with our kernel for the weight
    gradient where uses_weight_grad_kernel says so (then grad_weight and grad_bias are float32)."""
    need_x, need_weight, need_bias = needs
    ours = need_weight and uses_weight_grad_kernel(conv, x, x.dtype)
    mask = [need_x, need_weight and not ours, need_bias and not ours]
    grads = [None, None, None]
    if any(mask):
        grads = list(torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if mask[2] else None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0] * 3, conv.groups, mask))
    if ours:
        grads[1], grad_bias = conv3d_weight_grad(x, grad_out)
        grads[2] = grad_bias if need_bias else None
    return tuple(grads)


class _Conv3dWeightGrad(torch.autograd.Function):
    """conv(x) computed in `dtype` from float32 parameters, as autocast would compute it;
    backward through conv3d_backward, returning float32 parameter gradients directly."""

    @staticmethod
    def forward(ctx, conv, dtype, x, weight, bias):
        xc, wc = x.to(dtype), weight.to(dtype)
        out = torch.ops.aten.convolution(xc, wc, bias.to(dtype) if bias is not None else None, list(conv.stride),
                                         list(conv.padding), list(conv.dilation), False, [0] * 3, conv.groups)
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
    """nn.Conv3d (same parameters and state_dict keys) that, when training in bfloat16 on a CPU
    where it pays (uses_weight_grad_kernel), computes its weight gradient with our kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            dtype = compute_dtype(x, self.weight)
            if uses_weight_grad_kernel(self, x, dtype):
                return _Conv3dWeightGrad.apply(self, dtype, x, self.weight, self.bias)
        return super().forward(x)
