"""The weight (and bias) gradient of a 3x3x3 convolution (stride 1, padding 1) in bfloat16 on the CPU.

On CPUs with AVX512-BF16 and no AMX (AMD Zen 4, Intel Cooper Lake), oneDNN computes this
gradient with an older kernel at about half the speed of the same convolution's forward, and it
was the largest single cost of a bfloat16 training step of the paper's network (11 of its
convolutions at 29 channels, 64^3). csrc/cpu/conv3d_weight_grad.cpp computes it with VDPBF16PS
close to the forward's speed (29 channels 64^3, 2 threads: 32.9 ms, oneDNN 52.6, the forward
29.6), in float32 (oneDNN rounds its result to bfloat16).
benchmarks/conv_kernels.py measures both side by side.

Unlike the other ops this one has a single kernel (CPU, AVX512-BF16) and no backends: on GPUs
and on AMX CPUs the libraries' own weight gradients are the fast ones. nn/conv.py decides where
the U-Net uses it (`uses_weight_grad_kernel`).
"""

from __future__ import annotations

import torch

from .._extension import EXTENSION
from ._checks import check_cpu, check_tensor, cpu_kernel_runs, refuse_cpu_kernel

NAME = "conv3d_weight_grad"


def kernel_available() -> bool:
    """Whether patchddm::conv3d_weight_grad runs here (the extension and AVX512-BF16)."""
    return cpu_kernel_runs(NAME)


def conv3d_weight_grad_reference(input: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gradients from aten.convolution_backward in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    weight = input.new_empty((grad_out.shape[1], input.shape[1], 3, 3, 3), dtype=acc)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out.to(acc), input.to(acc), weight, [grad_out.shape[1]], [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
        [0, 0, 0], 1, [False, True, True])
    return grad_weight, grad_bias


def check_arguments(input: torch.Tensor, grad_out: torch.Tensor) -> None:
    check_tensor(NAME, "input", input, ndim=5, dtypes=(torch.bfloat16,))
    check_tensor(NAME, "grad_out", grad_out, ndim=5, dtypes=(torch.bfloat16,))
    check_cpu(NAME, input=input, grad_out=grad_out)
    if input.shape[0] != grad_out.shape[0] or input.shape[2:] != grad_out.shape[2:]:
        raise ValueError(f"{NAME}: grad_out has shape {tuple(grad_out.shape)}, which does not match input "
                         f"{tuple(input.shape)} (a 3x3x3 convolution with stride 1 and padding 1 keeps the "
                         "batch and the spatial size)")


def conv3d_weight_grad(input: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d weight, d loss / d bias) of conv3d(input, weight, bias, stride=1, padding=1),
    float32 (O, C, 3, 3, 3) and (O,).

    input: (B, C, D, H, W) and grad_out: (B, O, D, H, W), bfloat16 CPU tensors, fastest in
    channels_last_3d (others are copied to it). Needs the compiled extension and a CPU with
    AVX512-BF16 (kernel_available()); a clear error otherwise.
    """
    check_arguments(input, grad_out)
    refuse_cpu_kernel(NAME)
    return torch.ops.patchddm.conv3d_weight_grad(input, grad_out)


def fake_conv3d_weight_grad(input: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_ch = grad_out.shape[1]
    return (input.new_empty((out_ch, input.shape[1], 3, 3, 3), dtype=torch.float32),
            input.new_empty((out_ch,), dtype=torch.float32))


if EXTENSION.loaded:
    torch.library.register_fake(f"patchddm::{NAME}")(fake_conv3d_weight_grad)
