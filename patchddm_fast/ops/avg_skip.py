"""Averaging skip connection: (h + skip) / 2, as PatchDDM's decoder joins encoder features.

In the U-Net this is usually fused into the GroupNorm + SiLU that follows it
(group_norm_silu(..., skip=...)); this standalone op serves every other use.
"""

from __future__ import annotations

import torch

from .._extension import EXTENSION
from ._backends import FastOp
from ._checks import check_contiguous, check_like, check_tensor, opmath_dtype

OP = FastOp("avg_skip", native="avg_skip")


def avg_skip_reference(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch (h + skip) / 2, computed in float32 (float64 for float64 inputs)."""
    acc = opmath_dtype(h.dtype)
    return ((h.to(acc) + skip.to(acc)) * 0.5).to(h.dtype)


def check_arguments(name: str, h: torch.Tensor, skip: torch.Tensor, *, kernel_layout: bool = False) -> None:
    """The checks of every avg_skip backend (csrc/avg_skip_args.h makes the same for the C++ and
    CUDA kernels); kernel_layout: both contiguous, as the kernels read them (the public op
    makes them so itself)."""
    check_tensor(name, "h", h)
    check_like(name, "skip", skip, h, "h")
    if kernel_layout:
        check_contiguous(name, h=h, skip=skip)


def avg_skip(h: torch.Tensor, skip: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """(h + skip) / 2, elementwise, differentiable.

    h, skip: tensors of one shape, dtype (float32, float16, bfloat16 or float64) and device.
    Computes in float32 (float64 for float64 inputs) and returns a contiguous tensor of h's
    dtype. Gradient: grad / 2 to each input. `backend` picks an implementation (cpp, cuda,
    triton, torch); the default is the fastest available for the device.
    """
    check_arguments("avg_skip", h, skip)
    choice = OP.resolve(h.device, backend)
    if choice == "torch":
        return avg_skip_reference(h, skip)
    h, skip = h.contiguous(), skip.contiguous()
    if choice == "triton":
        return torch.ops.patchddm_triton.avg_skip(h, skip)
    return torch.ops.patchddm.avg_skip(h, skip)


def _setup_context(ctx, inputs, output):
    pass  # the gradient needs nothing from the forward


def _backward(ctx, grad):
    half = grad * 0.5
    return half, half


def register_autograd(qualname: str) -> None:
    """Autograd of an avg_skip op: the compiled one here, the Triton one in ops/triton."""
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


def fake_avg_skip(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)


if EXTENSION.loaded:
    torch.library.register_fake("patchddm::avg_skip")(fake_avg_skip)
    register_autograd("patchddm::avg_skip")
