"""A 3x3x3 convolution (stride 1, padding 1) on the CPU by Winograd's F(2x2x2, 3x3x3), in
bfloat16 or float32.

On CPUs with AVX512-BF16 and no AMX (AMD Zen 4, Intel Cooper Lake) oneDNN's bfloat16
convolutions already run near the CPU's dot-product rate, which left a bfloat16 training step
of the paper's network at about 2.3x the original's float32 step. Winograd's F(2, 3) in each of
the three dimensions takes 8 products per output and channel pair instead of 27;
csrc/cpu/conv3d_winograd.cpp computes them with VDPBF16PS (bfloat16) or FMA (float32, any
AVX-512 CPU) and the transforms in float32. AMD EPYC Zen 4, 2 threads, channels_last_3d,
against oneDNN: bfloat16 1.65x at 29 channels 64^3, 2.0x at 87 channels 32^3, 1.3x-1.5x at 116
channels 16^3, not faster below about 24 input channels or 16 x 16 planes (the transforms
outweigh the products); float32 2.1x, 2.5x and 2.0x there, not faster below about 16 channels
or 16 x 16 planes. benchmarks/conv_kernels.py measures it side by side.

In float32 the error is float32 rounding, like oneDNN's. In bfloat16 the price is precision:
the transformed input and weights are rounded to bfloat16 (autocast
rounds the input and the weights themselves), so on random data the rms error is 2.2x-3.4x a
direct bfloat16 convolution's (0.4-0.6 % of the output's rms, where the direct one's is its
output's rounding); tests/ops/test_conv3d_winograd.py bounds it. A convolution's input gradient is
the same op on grad_out with the weights flipped and transposed (`conv3d_winograd_input_grad`).
nn/conv.py decides where the U-Net uses it.
"""

from __future__ import annotations

import torch

from .._extension import EXTENSION
from ._checks import AVX512, AVX512_BF16, check_cpu, check_tensor, cpu_kernel_runs, refuse_cpu_kernel

NAME = "conv3d_winograd"
DTYPES = (torch.bfloat16, torch.float32)


def _needs(dtype: torch.dtype) -> tuple[str, ...]:
    return AVX512_BF16 if dtype == torch.bfloat16 else AVX512


def kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether patchddm::conv3d_winograd runs here for dtype: the extension, and AVX512-BF16
    for bfloat16 or AVX-512 for float32."""
    return cpu_kernel_runs(NAME, _needs(dtype))


def conv3d_winograd_reference(input: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution it computes, by aten in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    return torch.nn.functional.conv3d(input.to(acc), weight.to(acc), bias.to(acc) if bias is not None else None,
                                      padding=1)


# F(2, 3): y = A^T [(G g) * (B^T d)] along each dimension (Lavin and Gray 2016).
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
BFLOAT16_UNIT = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
FLOAT32_UNIT = 2.0 ** -24


def _winograd(x: torch.Tensor, weight: torch.Tensor, absolute: bool) -> torch.Tensor:
    """Winograd's algorithm in float64, without rounding; with absolute=True, on |x|, |weight|
    and the transforms' absolute values: the magnitude behind each output's rounding errors."""
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
    x, weight = x.double(), weight.double()
    if absolute:
        bt, g, at, x, weight = bt.abs(), g.abs(), at.abs(), x.abs(), weight.abs()
    b, _, d, h, w = x.shape
    # Pad by one on each side, plus one where a size is odd: whole tiles of 2 outputs, each
    # reading 4 inputs, every 2.
    tiles = torch.nn.functional.pad(x, (1, 1 + w % 2, 1, 1 + h % 2, 1, 1 + d % 2))
    tiles = tiles.unfold(2, 4, 2).unfold(3, 4, 2).unfold(4, 4, 2)  # (B, C, TD, TH, TW, 4, 4, 4)
    v = torch.einsum("ai,bj,ek,nqzyxijk->nqzyxabe", bt, bt, bt, tiles)  # q: input channel
    u = torch.einsum("ai,bj,ek,oqijk->oqabe", g, g, g, weight)
    m = torch.einsum("nqzyxabe,oqabe->nozyxabe", v, u)
    y = torch.einsum("ia,jb,ke,nozyxabe->nozyxijk", at, at, at, m)
    o, (td, th, tw) = y.shape[1], y.shape[2:5]
    y = y.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(b, o, 2 * td, 2 * th, 2 * tw)
    return y[:, :, :d, :h, :w]


def conv3d_winograd_error_bound(input: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """A bound on |conv3d_winograd(input, weight, bias) - the exact convolution|, float64, per
    output, for input's dtype (the values of input, weight and bias as given).

    bfloat16: the kernel rounds the transformed input V and weights U to bfloat16 (relative
    error at most u = 2^-8 each) and forms each product exactly in float32, so a product is off
    by at most (2u + u^2) |U| |V|; the float32 sums (the transforms', the products' over at most
    a few hundred channels, the output transform's) add under 0.01 u relative. Summed through
    the output transform with absolute values, that is 2.02 u times the same algorithm run on
    absolute values; the final rounding to bfloat16 adds u (1.001 covering the bias's float32
    addition) of the result. Valid for up to about 600 input channels.

    float32 (u = 2^-24): every value is a float32 sum along a chain of roundings, each at most
    u relative to the magnitudes summed: V's 3 (one per dimension), U's 6 (a sum and a halving
    per dimension, the halving exact), the products and their sum over C channels C + 1, the
    output transform's 6 and the bias's 1. So (C + 20) u times the algorithm on absolute values
    bounds it to first order; 1.01 covers the second."""
    bias_size = bias.double().abs().reshape(1, -1, 1, 1, 1) if bias is not None else 0.0
    magnitude = _winograd(input, weight, absolute=True)
    if input.dtype == torch.float32:
        return 1.01 * (input.shape[1] + 20) * FLOAT32_UNIT * (magnitude + bias_size)
    exact = conv3d_winograd_reference(input.double(), weight.double(), bias.double() if bias is not None else None)
    return 2.02 * BFLOAT16_UNIT * magnitude + 1.001 * BFLOAT16_UNIT * (exact.abs() + bias_size)


def check_arguments(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensor(NAME, "input", input, ndim=5, dtypes=DTYPES)
    check_tensor(NAME, "weight", weight, ndim=5, dtypes=(torch.bfloat16, torch.float32))
    if bias is not None:
        check_tensor(NAME, "bias", bias, ndim=1, dtypes=(torch.bfloat16, torch.float32))
    check_cpu(NAME, input=input, weight=weight, bias=bias)
    if weight.shape[1:] != (input.shape[1], 3, 3, 3):
        raise ValueError(f"{NAME}: weight has shape {tuple(weight.shape)}; expected (O, {input.shape[1]}, 3, 3, 3) "
                         f"for input {tuple(input.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{NAME}: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")


def conv3d_winograd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv3d(input, weight, bias, stride=1, padding=1) in input's dtype, (B, O, D, H, W) in
    channels_last_3d.

    input: (B, C, D, H, W) bfloat16 or float32 CPU tensor, fastest in channels_last_3d (others
    are copied to it); weight (O, C, 3, 3, 3) and bias (O,): bfloat16 or float32. Needs the
    compiled extension and a CPU with AVX512-BF16 for bfloat16, AVX-512 for float32
    (kernel_available(dtype)); a clear error otherwise.
    """
    check_arguments(input, weight, bias)
    refuse_cpu_kernel(NAME, _needs(input.dtype))
    return torch.ops.patchddm.conv3d_winograd(input, weight, bias)


def conv3d_winograd_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d loss / d input of conv3d(input, weight, stride=1, padding=1) from grad_out (B, O, D, H, W):
    the convolution of grad_out with the weights flipped in space and transposed (C, O, 3, 3, 3)."""
    return conv3d_winograd(grad_out, weight.flip(2, 3, 4).transpose(0, 1))


def fake_conv3d_winograd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    b, _, d, h, w = input.shape
    return input.new_empty((b, weight.shape[0], d, h, w)).contiguous(memory_format=torch.channels_last_3d)


if EXTENSION.loaded:
    torch.library.register_fake(f"patchddm::{NAME}")(fake_conv3d_winograd)
