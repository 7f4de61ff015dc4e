"""The U-Net's no-grad forward in slabs of depth planes: whole volumes in about half the memory.

Without gradients, the plain forward of a ResBlock holds its input (the residual), the norm's
output and the convolution's output at full size, on top of the encoder's skips. Here the
GroupNorm + SiLU in front of each convolution is applied to a few depth planes at a time,
just before the convolution reads them, so a normalised tensor never exists at full size:

  1. per-channel sums of the norm's input give each (batch, group)'s mean and rstd (the
     statistics are global: they are gathered before anything is normalised; the timestep
     bias enters through the sums, so the biased tensor is never formed either);
  2. each plane is normalised once, into a window of planes that rolls along depth, and a
     3x3x3 convolution of the window writes the slab of output planes it covers. Since the
     window holds every normalised plane that later slabs still read, the output may
     overwrite the convolution's own input: a ResBlock's output lands in its first
     convolution's buffer.

The input convolution's output (the first skip, 29 channels at full size in the paper) is not
kept either: the decoder recomputes it slab by slab from the network's input (8 channels), a
tenth of one full-size convolution. What stays at full size is the decoder's input and first
convolution output plus the skips still on the stack: three tensors at the first decoder
block of full resolution, against the plain forward's five (the original's six).

The arithmetic is the plain forward's except for summation order (statistics from float64
sums of float32 slab sums; the convolution of a slab instead of the volume) and the norm's
affine map, applied as x * scale + shift (scale = rstd * weight, shift folding mean, bias and
the timestep bias): equal within float32 rounding, see tests/nn/test_streaming.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

# Depth planes per slab: the slab's temporaries (the window of normalised planes, the
# convolution's output) are about 3 * SLAB_PLANES / depth of one full-size tensor, and fewer,
# larger convolution calls run faster. 8 planes keep the temporaries near a fifth of one
# full-size tensor at 128^3 (a tenth at 256^3).
SLAB_PLANES = 8
# Levels with fewer than this many slabs run the plain blocks: their tensors are small (an
# eighth of the full resolution's per halving, times the channel ratio) and the slab loop's
# per-call overhead would cost more than their memory is worth.
MIN_SLABS = 4


def streams(depth: int, planes: int | None) -> bool:
    """Whether a level of this depth runs in slabs of `planes` (None: never)."""
    return planes is not None and depth >= MIN_SLABS * planes


def _conv_fits(conv: nn.Conv3d) -> bool:
    # The window logic assumes a 3-plane (or 1-plane) stencil, stride 1, 'same' padding.
    k = conv.kernel_size[0]
    return (conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and k in (1, 3) and conv.padding[0] == k // 2)


# -- GroupNorm statistics from per-channel sums ------------------------------------------------

class Moments:
    """Per-(batch, channel) sums of t and t^2 over the spatial dims, gathered slab by slab:
    float32 sums of each slab (a cascade sum, no temporary; float64 for float64 tensors),
    added up in float64."""

    def __init__(self):
        self.s1 = self.s2 = None
        self.count = 0
        self.dtype = torch.float32  # of the norm's arithmetic: float64 for float64 tensors

    def add(self, t: torch.Tensor) -> None:
        dims = tuple(range(2, t.dim()))
        if t.dtype == torch.float64:
            self.dtype = torch.float64
        s1 = torch.sum(t, dims, dtype=self.dtype).double()
        s2 = torch.linalg.vector_norm(t, 2, dims, dtype=self.dtype).double().square()
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.count += t[0, 0].numel()

    @classmethod
    def of(cls, t: torch.Tensor, planes: int) -> "Moments":
        moments = cls()
        for d0 in range(0, t.shape[2], planes):
            moments.add(t[:, :, d0:d0 + planes])
        return moments

    def affine(self, norm: nn.Module, add: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), (B, C, 1, 1, 1) in float32 (float64 for float64 tensors):
        silu(x * scale + shift) is norm's fused silu(group_norm(x + add) * weight + bias)."""
        s1, s2, n = self.s1, self.s2, self.count
        batch, channels = s1.shape
        groups = norm.num_groups
        a = add.double() if add is not None else torch.zeros_like(s1)
        if add is not None:  # sums of x + add: (x + a)^2 = x^2 + 2 a x + a^2
            s1, s2 = s1 + n * a, s2 + 2 * a * s1 + n * a * a
        per_group = n * (channels // groups)
        mean = s1.view(batch, groups, -1).sum(-1) / per_group
        var = (s2.view(batch, groups, -1).sum(-1) / per_group - mean.square()).clamp_min(0)
        rstd = (var + norm.eps).rsqrt()
        expand = channels // groups
        mean, rstd = mean.repeat_interleave(expand, 1), rstd.repeat_interleave(expand, 1)
        weight = norm.weight.double() if norm.weight is not None else 1.0
        bias = norm.bias.double() if norm.bias is not None else 0.0
        scale = rstd * weight
        shift = (a - mean) * scale + bias
        shape = (batch, channels) + (1,) * 3
        return scale.to(self.dtype).view(shape), shift.to(self.dtype).view(shape)


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


def _normalised(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # In scale's dtype (float32, or float64), rounded once to x's dtype, as the fused op does.
    return F.silu(torch.addcmul(shift, x, scale), inplace=True).to(x.dtype)


# -- the slab loop -----------------------------------------------------------------------------

def norm_conv(src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, conv: nn.Conv3d,
              dst: torch.Tensor | None, planes: int, residual=None, moments: Moments | None = None
              ) -> torch.Tensor:
    """dst = conv(silu(src * scale + shift)) [+ residual(d0, d1) per slab], slab by slab.

    dst: the output buffer (allocated when None), which may be src itself. residual: a
    function of the slab's depth range returning the tensor to add. moments: gathers the
    output's per-channel sums on the way (for the next norm)."""
    depth = src.shape[2]
    halo = conv.kernel_size[0] // 2
    padding = (0,) + tuple(conv.padding[1:])
    window = zero = None  # window: normalised planes d0 - halo .. d0 + halo - 1, from the last slab
    if halo:
        first = _normalised(src[:, :, :halo], scale, shift)
        zero = torch.zeros_like(first[:, :, :1])
        window = torch.cat([zero.expand(-1, -1, halo, -1, -1), first], 2)
        del first
    for d0 in range(0, depth, planes):
        d1 = min(d0 + planes, depth)
        fresh = _normalised(src[:, :, d0 + halo:d1 + halo], scale, shift)
        parts = [fresh] if window is None else [window, fresh]
        if d1 + halo > depth:  # zero planes past the end
            parts.append(zero.expand(-1, -1, d1 + halo - depth, -1, -1))
        full = torch.cat(parts, 2) if len(parts) > 1 else fresh
        del fresh, parts
        out = _conv(full, conv.weight, conv.bias, padding)
        window = full[:, :, -2 * halo:].clone() if halo else None
        del full
        if residual is not None:
            add = residual(d0, d1)
            out = out.add_(add) if out.dtype == add.dtype else out + add
            del add
        if dst is None:
            dst = torch.empty(out.shape[:2] + (depth,) + out.shape[3:], dtype=out.dtype,
                              device=out.device, memory_format=_layout(out))
        dst[:, :, d0:d1] = out
        if moments is not None:
            moments.add(out)
        del out
    return dst


def _layout(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class RecomputedConv:
    """A convolution's output that is recomputed slab by slab instead of kept: conv(x)."""

    def __init__(self, conv: nn.Conv3d, x: torch.Tensor):
        self.conv, self.x = conv, x
        self.shape = (x.shape[0], conv.out_channels) + tuple(x.shape[2:])

    def full(self) -> torch.Tensor:
        return self.conv(self.x)

    def slab(self, d0: int, d1: int) -> torch.Tensor:
        halo = self.conv.kernel_size[0] // 2
        depth = self.x.shape[2]
        lo, hi = max(d0 - halo, 0), min(d1 + halo, depth)
        part = F.pad(self.x[:, :, lo:hi], (0, 0, 0, 0, halo - (d0 - lo), halo - (hi - d1)))
        return _conv(part, self.conv.weight, self.conv.bias, (0,) + tuple(self.conv.padding[1:]))


# -- blocks -------------------------------------------------------------------------------------

def average_into(x: torch.Tensor, skip, planes: int) -> Moments:
    """x = (x + skip) / 2 in place (skip: a tensor or a RecomputedConv), slab by slab, and
    the average's moments. Halving is exact: one rounding, as the plain block's."""
    moments = Moments()
    for d0 in range(0, x.shape[2], planes):
        d1 = min(d0 + planes, x.shape[2])
        part = x[:, :, d0:d1]
        other = skip.slab(d0, d1) if isinstance(skip, RecomputedConv) else skip[:, :, d0:d1]
        part.add_(other).mul_(0.5)
        del other
        moments.add(part)
    return moments


def resblock(block: nn.Module, inputs: list, emb: torch.Tensor, planes: int) -> torch.Tensor:
    """The ResBlock's forward without gradients, slab by slab, of x and skip taken out of the
    list `inputs` (emptied, so that the skip is freed once averaged in). With a skip, x must
    be the caller's to overwrite (the decoder's own tensor); without one, x is only read."""
    x, skip = inputs
    inputs.clear()
    if skip is not None:
        moments = average_into(x, skip, planes)
        del skip
    else:
        moments = Moments.of(x, planes)
    norm1, conv1 = block.in_layers[0], block.in_layers[2]
    norm2, conv2 = block.out_layers[0], block.out_layers[3]
    scale, shift = moments.affine(norm1, None)
    inner = Moments()
    h = norm_conv(x, scale, shift, conv1, None, planes, moments=inner)
    scale, shift = inner.affine(norm2, block.emb_layers(emb))
    if isinstance(block.skip_connection, nn.Identity):
        def residual(d0, d1):
            return x[:, :, d0:d1]
    else:
        def residual(d0, d1):
            return block.skip_connection(x[:, :, d0:d1])
    # The output overwrites the first convolution's output, whose planes the window still has.
    dst = h if h.dtype == torch.result_type(h, x) else None
    return norm_conv(h, scale, shift, conv2, dst, planes, residual)


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
    scale, shift = Moments.of(x, planes).affine(out_head[0], None)
    return norm_conv(x, scale, shift, out_head[2], None, planes)
