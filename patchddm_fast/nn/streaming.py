"""The U-Net's no-grad forward in slabs of depth planes: whole volumes in about half the memory.

Without gradients, the plain forward of a ResBlock holds its input (the residual), the norm's
output and the convolution's output at full size, on top of the encoder's skips. Here the
GroupNorm + SiLU in front of each convolution is applied to a few depth planes at a time,
just before the convolution reads them, so a normalised tensor never exists at full size:

  1. each (batch, group)'s mean and rstd of the norm's whole input (+ the timestep bias, never
     formed as a tensor) come first (ops.group_norm_silu_stats: the fused norm's first pass);
     the statistics are global, so they must be known before anything is normalised;
  2. each plane is normalised once (ops.group_norm_silu_apply: the fused norm's second pass
     with the statistics given), into a window of planes that rolls along depth, and a
     3x3x3 convolution of the window writes the slab of output planes it covers. Since the
     window holds every normalised plane that later slabs still read, the output may
     overwrite the convolution's own input: a ResBlock's output lands in its first
     convolution's buffer.

The input convolution's output (the first skip, 29 channels at full size in the paper) is not
kept either: the decoder recomputes it slab by slab from the network's input (8 channels), a
tenth of one full-size convolution. What stays at full size is the decoder's input and first
convolution output plus the skips still on the stack: three tensors at the first decoder
block of full resolution, against the plain forward's five (the original's six).

The norms compute what the fused forward computes, bit for bit (its two passes with the same
arithmetic); only the convolution of a slab instead of the volume changes summation order,
and with it the bits of what follows. Equal within float32 rounding, see
tests/nn/test_streaming.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ..ops import group_norm_silu_apply, group_norm_silu_stats
from ..ops.group_norm_silu import memory_format

# Depth planes per slab: the slab's temporaries (the window of normalised planes, the
# convolution's output) are about 3 * SLAB_PLANES / depth of one full-size tensor, and fewer,
# larger convolution calls run faster. 8 planes keep the temporaries near a fifth of one
# full-size tensor at 128^3 (a tenth at 256^3).
SLAB_PLANES = 8
# Levels with fewer than this many slabs, or whose tensors are smaller than MIN_BYTES, run the
# plain blocks: memory is not what limits them, and there slab convolutions ran slower (the
# paper's network at 64^3 under bf16 autocast: 8-15% slower in slabs, 15 MiB per tensor; at
# 128^3, 121 MiB, 5-15% faster; AMD EPYC, 2 threads).
MIN_SLABS = 4
MIN_BYTES = 32 * 2**20


def streams(depth: int, nbytes: int, planes: int | None, min_bytes: int | None = None) -> bool:
    """Whether a level of this depth and these bytes per tensor runs in slabs of `planes`
    (None: never); min_bytes: MIN_BYTES unless given."""
    return (planes is not None and depth >= MIN_SLABS * planes
            and nbytes >= (MIN_BYTES if min_bytes is None else min_bytes))


def _conv_fits(conv: nn.Conv3d) -> bool:
    # The window logic assumes a 3-plane (or 1-plane) stencil, stride 1, 'same' padding.
    k = conv.kernel_size[0]
    return (conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and k in (1, 3) and conv.padding[0] == k // 2)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    # PyTorch sends a float32 CPU convolution whose N * C * D * H is at most 20480 to its slow
    # reference kernel (a heuristic for small inputs): a slab of 8 planes at 64^2 with 29
    # channels ran 7x slower there than in oneDNN, which the whole tensor gets. The slabs call
    # oneDNN directly in that case. Fake tensors (memory counting) have no oneDNN kernel.
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not is_fake(x)
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
            and torch._C._get_mkldnn_enabled()):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, padding=padding)


class _Norm:
    """A fused norm's normalisation with the statistics of the whole tensor t (+ add, the
    timestep bias), applied to slabs: the fused forward's two passes, taken apart."""

    def __init__(self, norm: nn.Module, t: torch.Tensor, add: torch.Tensor | None = None):
        self.norm, self.add = norm, add
        self.mean, self.rstd = group_norm_silu_stats(t, add, norm.num_groups, norm.eps)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        group_norm_silu_apply(x, self.mean, self.rstd, self.add, self.norm.weight, self.norm.bias,
                              self.norm.num_groups, out=out)


# -- the slab loop -----------------------------------------------------------------------------

def norm_conv(src: torch.Tensor, norm: _Norm, conv: nn.Conv3d, dst: torch.Tensor | None, planes: int,
              residual=None) -> torch.Tensor:
    """dst = conv(norm(src)) [+ residual(d0, d1) per slab], slab by slab.

    dst: the output buffer (allocated when None), which may be src itself. residual: a
    function of the slab's depth range returning the tensor to add."""
    depth = src.shape[2]
    halo = conv.kernel_size[0] // 2
    padding = (0,) + tuple(conv.padding[1:])
    # The window holds the normalised planes d0 - halo .. d1 + halo - 1 of the slab [d0, d1):
    # the 2 * halo planes it shares with the next slab move to its front, the rest are new.
    window = torch.empty(src.shape[:2] + (min(planes, depth) + 2 * halo,) + src.shape[3:], dtype=src.dtype,
                         device=src.device, memory_format=memory_format(src))
    if halo:
        window[:, :, :halo].zero_()
        norm(src[:, :, :halo], window[:, :, halo:2 * halo])
    for d0 in range(0, depth, planes):
        d1 = min(d0 + planes, depth)
        count = d1 - d0 + 2 * halo  # planes of this slab's window
        last = min(d1 + halo, depth)  # fresh planes: d0 + halo .. last - 1, zeros past the end
        if last > d0 + halo:
            norm(src[:, :, d0 + halo:last], window[:, :, 2 * halo:2 * halo + last - d0 - halo])
        if last < d1 + halo:
            window[:, :, count - (d1 + halo - last):count].zero_()
        out = _conv(window[:, :, :count], conv.weight, conv.bias, padding)
        if halo:  # a copy: the source and target planes overlap when the slab is one plane
            window[:, :, :2 * halo] = window[:, :, count - 2 * halo:count].clone()
        if residual is not None:
            add = residual(d0, d1)
            out = out.add_(add) if out.dtype == add.dtype else out + add
            del add
        if dst is None:
            dst = torch.empty(out.shape[:2] + (depth,) + out.shape[3:], dtype=out.dtype,
                              device=out.device, memory_format=memory_format(out))
        dst[:, :, d0:d1] = out
        del out
    return dst


class RecomputedConv:
    """A convolution's output that is recomputed slab by slab instead of kept: conv(x)."""

    def __init__(self, conv: nn.Conv3d, x: torch.Tensor):
        self.conv, self.x = conv, x

    def full(self) -> torch.Tensor:
        return self.conv(self.x)

    def slab(self, d0: int, d1: int) -> torch.Tensor:
        halo = self.conv.kernel_size[0] // 2
        depth = self.x.shape[2]
        lo, hi = max(d0 - halo, 0), min(d1 + halo, depth)
        part = F.pad(self.x[:, :, lo:hi], (0, 0, 0, 0, halo - (d0 - lo), halo - (hi - d1)))
        return _conv(part, self.conv.weight, self.conv.bias, (0,) + tuple(self.conv.padding[1:]))


# -- blocks -------------------------------------------------------------------------------------

def average_into(x: torch.Tensor, skip, planes: int) -> None:
    """x = (x + skip) / 2 in place (skip: a tensor or a RecomputedConv), slab by slab.
    Halving is exact: one rounding, as the plain block's."""
    for d0 in range(0, x.shape[2], planes):
        d1 = min(d0 + planes, x.shape[2])
        part = x[:, :, d0:d1]
        other = skip.slab(d0, d1) if isinstance(skip, RecomputedConv) else skip[:, :, d0:d1]
        part.add_(other).mul_(0.5)
        del other


def resblock(block: nn.Module, inputs: list, emb: torch.Tensor, planes: int) -> torch.Tensor:
    """The ResBlock's forward without gradients, slab by slab, of x and skip taken out of the
    list `inputs` (emptied, so that the skip is freed once averaged in). With a skip, x must
    be the caller's to overwrite (the decoder's own tensor); without one, x is only read."""
    x, skip = inputs
    inputs.clear()
    if skip is not None:
        average_into(x, skip, planes)
        del skip
    h = norm_conv(x, _Norm(block.in_layers[0], x), block.in_layers[2], None, planes)
    norm2 = _Norm(block.out_layers[0], h, block.emb_layers(emb))
    if isinstance(block.skip_connection, nn.Identity):
        def residual(d0, d1):
            return x[:, :, d0:d1]
    else:
        def residual(d0, d1):
            return block.skip_connection(x[:, :, d0:d1])
    # The output overwrites the first convolution's output, whose planes the window still has.
    dst = h if h.dtype == torch.result_type(h, x) else None
    return norm_conv(h, norm2, block.out_layers[3], dst, planes, residual)


def block_fits(block: nn.Module) -> bool:
    """Whether a ResBlock can run in slabs: no dropout in use, 3-D convolutions of the kind
    the window handles, fused norms (their parameters are read directly)."""
    convs = [block.in_layers[2], block.out_layers[3]]
    if not isinstance(block.skip_connection, nn.Identity):
        convs.append(block.skip_connection)
    return (block.fused and not (block.training and block.dropout > 0)
            and all(isinstance(c, nn.Conv3d) and _conv_fits(c) for c in convs))


def head(out_head: nn.Module, x: torch.Tensor, planes: int) -> torch.Tensor:
    """The output head (norm, SiLU, convolution) slab by slab."""
    return norm_conv(x, _Norm(out_head[0], x), out_head[2], None, planes)
