"""PatchDDM's 3D diffusion U-Net on the fused ops, with the plain-PyTorch baseline beside it.

Block layout (guided-diffusion's UNetModel with averaging skips, no attention), for L levels
of channels c_l = model_channels * channel_mult[l] and R = num_res_blocks:

  input_blocks.0.0           Conv3d(in_channels -> c_0), 3x3x3
  per level l:  R x          ResBlock(-> c_l)                         input_blocks.k.0
                (l < L-1)    Downsample: Conv3d 3x3x3 stride 2         input_blocks.k.0.op
  middle_block.{0,1}         ResBlock(c_{L-1} -> c_{L-1})
  per level l = L-1 .. 0:  R+1 x
        h = (h + skip) / 2   skip = the latest unused input_blocks output (a stack)
        ResBlock(-> channels of the next skip on the stack; c_0 after the last)  output_blocks.k.0
        (l > 0, last of level)  Upsample: nearest x2, Conv3d 3x3x3      output_blocks.k.1.conv
  out                        GroupNorm, SiLU, Conv3d(c_0 -> out_channels)

Every encoder output is pushed (input_blocks.0 included), every decoder ResBlock pops one,
so the averaged tensors always have equal channels and sizes. The module names equal the
original's, so an original state_dict loads key for key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..ops.group_norm_silu import memory_format
from .config import PAPER, SMALL, UNetConfig
from .conv import Conv3d
from .norm import FusedGroupNormSiLU, GroupNorm32, norm_act
from . import streaming
from .recompute import draw_seed, recomputed_pre_conv, seeded_dropout

CHECKPOINT_MODES = ("off", "cheap", "blocks")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f), sin(t f)], f_i = max_period^(-i/half),
    half = dim // 2, zero-padded by one column when dim is odd; float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _norm_layers(fused: bool, groups: int, channels: int) -> list[nn.Module]:
    # The fused norm includes the SiLU; an Identity keeps the original's indices (and keys).
    if fused:
        return [FusedGroupNormSiLU(groups, channels), nn.Identity()]
    return [GroupNorm32(groups, channels), nn.SiLU()]


def _conv3(cin: int, cout: int, stride: int = 1, fused: bool = False) -> nn.Conv3d:
    # The fused network's Conv3d: our CPU convolution kernels in training where faster (nn/conv.py).
    return (Conv3d if fused else nn.Conv3d)(cin, cout, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, Conv3d; + timestep bias; GroupNorm, SiLU, Dropout, Conv3d; + residual.

    forward(x, emb, skip=None): with skip, the block's input is (x + skip) / 2 (the decoder's
    averaging skip), fused into the first norm when the block is fused.
    checkpoint: "off"; "cheap" (store the norm inputs, recompute norm + SiLU in backward);
    "blocks" (store the block's inputs, recompute the whole block in backward).
    """

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int,
                 dropout: float = 0.0, fused: bool = True, checkpoint: str = "off"):
        super().__init__()
        self.fused, self.checkpoint, self.dropout = fused, checkpoint, dropout
        self.in_layers = nn.Sequential(*_norm_layers(fused, groups, channels),
                                       _conv3(channels, out_channels, fused=fused))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(*_norm_layers(fused, groups, out_channels), nn.Dropout(dropout),
                                        _conv3(out_channels, out_channels, fused=fused))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv3d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return self.consume([x, skip], emb)

    def consume(self, inputs: list, emb: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """forward(x, emb, skip) with x and skip taken out of the list `inputs` (emptied): when
        the caller holds no other reference, they are freed as soon as the averaging has
        used them (as the original frees h and the popped skip once it has averaged them).
        overwrite: the fused block may also average in place into x while no gradients are
        recorded (the caller guarantees that nothing else uses x)."""
        if self.checkpoint == "blocks" and torch.is_grad_enabled():
            # The recomputation calls the function again with the same arguments: no list.
            x, skip = inputs
            inputs.clear()
            return torch_checkpoint(lambda x, skip, emb: self._forward([x, skip], emb), x, skip, emb,
                                    use_reentrant=False)
        return self._forward(inputs, emb, overwrite)

    def _in_pre(self, x, add, skip):
        return norm_act(self.in_layers[0], self.in_layers[1], x, add, skip)

    def _out_pre(self, h, add, skip, seed=None):
        _, y = norm_act(self.out_layers[0], self.out_layers[1], h, add, skip)
        if seed is not None:
            y = seeded_dropout(y, self.dropout, seed)
        elif self.training and self.dropout > 0:
            y = self.out_layers[2](y)
        return None, y

    def _forward(self, inputs, emb, overwrite=False):
        # Every intermediate is dropped as soon as it has been used: without gradients, at
        # most the residual and two full-size tensors are alive in the block. Tensors that a
        # step frees are handed to it in a list, so that no name here keeps them alive.
        x, skip = inputs
        inputs.clear()
        add = self.emb_layers(emb)
        cheap = self.checkpoint == "cheap" and torch.is_grad_enabled()
        x, skip = self._average_first(x, skip, overwrite)
        h, x = self._in_path(x, skip, cheap)  # x: the decoder's average, when the norm made it
        del skip
        h = [h]
        h = self._out_path(h, add, cheap)
        residual = self.skip_connection(x)
        del x
        if self.fused and residual.dtype == h.dtype:
            return h.add_(residual)  # the convolution's output is not saved by anyone
        return residual + h

    def _average_first(self, x, skip, overwrite):
        """(x, skip), or ((x + skip) / 2, None) when the average is not left to the fused norm:
        the baseline averages first, as the original; the fused block without gradients into
        x's memory ((x + skip) rounded once: halving is exact), freeing the skip."""
        if skip is None:
            return x, None
        if not self.fused:
            return (x + skip) / 2, None
        if overwrite and not torch.is_grad_enabled() and x.dtype == skip.dtype and x.shape == skip.shape:
            return x.add_(skip).mul_(0.5), None
        return x, skip

    def _in_path(self, x, skip, cheap):
        """(first convolution's output, the block's input: x, or the average the norm made of
        x and skip)."""
        if cheap:
            h, average = recomputed_pre_conv(self._in_pre, self.in_layers[2], x, skip,
                                             pre_params=self.in_layers[0].parameters())
        else:
            average, y = self._in_pre(x, None, skip)
            h = self.in_layers[2](y)
            del y
        return h, (average if average is not None else x)

    def _out_path(self, box: list, add, cheap):
        """Timestep bias, norm, SiLU, dropout and the second convolution of h = box.pop()."""
        h = box.pop()
        if cheap:
            # Dropout's mask must come out the same when backward recomputes it.
            seed = draw_seed() if self.training and self.dropout > 0 else None
            return recomputed_pre_conv(partial(self._out_pre, seed=seed), self.out_layers[3], h,
                                       add=add, pre_params=self.out_layers[0].parameters())[0]
        if not self.fused:  # the original's `h = h + emb_out`, which frees the conv output
            h = h + add.reshape(add.shape + (1,) * (h.dim() - 2))
            add = None
        _, y = self._out_pre(h, add, None)
        del h
        return self.out_layers[3](y)


class Downsample(nn.Module):
    """Conv3d 3x3x3, stride 2, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = _conv3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def _nearest_x2(x, add=None, skip=None, *, exact_dtype: bool):
    if exact_dtype:
        # Nearest interpolation copies values: any dtype is exact, so keep x's dtype instead
        # of autocast's float32 (8x the input's size, in the upsampling's largest tensor).
        with torch.autocast(x.device.type, enabled=False):
            return None, F.interpolate(x, scale_factor=2, mode="nearest")
    return None, F.interpolate(x, scale_factor=2, mode="nearest")


# Nearest x2 then a 3-tap convolution, per output parity a along one axis: output 2i + a reads
# the upsampled positions 2i + a - 1 .. 2i + a + 1, i.e. x[i - 1], x[i], x[i] (a = 0) or x[i],
# x[i], x[i + 1] (a = 1): two taps of x, whose weights are sums of the three. Row a of
# _PARITY_TAPS maps the 3 weights to those 2 taps.
_PARITY_TAPS = ((( 1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
                (( 1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def upsample_conv_by_parity(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """conv(nearest_x2(x)) for a 3x3x3 convolution with padding 1 and stride 1, without the 8x
    upsampled tensor: each of the 8 output parities is a 2x2x2 convolution of x (zero-padded by
    one) with weights summed from the 3x3x3 ones, written into its strided slice of the output.
    Holds the output and one parity's result (1/8 of it) instead of the upsampled input and the
    output, and does 64 instead of 216 multiply-adds per input voxel and output channel. Equal
    to the plain pair up to the rounding of the summed weights and the regrouped sums."""
    weight, bias = conv.weight, conv.bias
    taps = [torch.tensor(t, dtype=weight.dtype, device=weight.device) for t in _PARITY_TAPS]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    n, _, d, h, w = x.shape
    out = None
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                k = torch.einsum("pi,qj,rk,ocijk->ocpqr", taps[a], taps[b], taps[c], weight)
                part = F.conv3d(xp[:, :, a:a + d + 1, b:b + h + 1, c:c + w + 1], k, bias)
                if out is None:
                    out = torch.empty((n, part.shape[1], 2 * d, 2 * h, 2 * w), dtype=part.dtype,
                                      device=part.device, memory_format=memory_format(part))
                out[:, :, a::2, b::2, c::2] = part
                del part
    return out


class Upsample(nn.Module):
    """Nearest-neighbour x2, then Conv3d 3x3x3. Without gradients, the fused network computes
    the pair by output parity (upsample_conv_by_parity), never holding the upsampled tensor."""

    def __init__(self, channels: int, fused: bool = True, checkpoint: str = "off"):
        super().__init__()
        self.fused, self.checkpoint = fused, checkpoint
        self.conv = _conv3(channels, channels, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.is_grad_enabled():
            return upsample_conv_by_parity(x, self.conv)
        pre = partial(_nearest_x2, exact_dtype=self.fused)
        if self.checkpoint == "cheap" and torch.is_grad_enabled():
            return recomputed_pre_conv(pre, self.conv, x)[0]
        return self.conv(pre(x)[1])


class OutputHead(nn.Sequential):
    """GroupNorm, SiLU, Conv3d(model_channels -> out_channels): keys out.0 and out.2."""

    def __init__(self, channels: int, out_channels: int, groups: int, fused: bool = True,
                 checkpoint: str = "off"):
        super().__init__(*_norm_layers(fused, groups, channels), _conv3(channels, out_channels, fused=fused))
        self.checkpoint = checkpoint

    def _pre(self, x, add, skip):
        return norm_act(self[0], self[1], x, add, skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint == "cheap" and torch.is_grad_enabled():
            return recomputed_pre_conv(self._pre, self[2], x, pre_params=self[0].parameters())[0]
        return self[2](self._pre(x, None, None)[1])


def _per_level(checkpoint, levels: int) -> tuple[str, ...]:
    modes = (checkpoint,) * levels if isinstance(checkpoint, str) else tuple(checkpoint)
    if len(modes) != levels or any(m not in CHECKPOINT_MODES for m in modes):
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES} or a sequence of them, one "
                         f"per level ({levels} levels); got {checkpoint!r}")
    return modes


class UNet3D(nn.Module):
    """PatchDDM's 3D diffusion U-Net: model(x, timesteps) -> predicted noise.

    config: a UNetConfig (default: the paper's); keyword overrides of its fields are accepted
        too, e.g. UNet3D(model_channels=8, channel_mult=(1, 2, 4)).
    fused: True: the fused ops (GroupNorm + SiLU + timestep bias + averaging skip in one op);
        False: the same network in plain PyTorch, as the original computes it (the baseline).
        Both have identical parameters and state_dict keys.
    checkpoint: activation checkpointing, "off" | "cheap" | "blocks", or one mode per level
        (level 0 = full resolution; the middle block follows the last level). Only active
        while gradients are recorded; inference runs as with "off". "cheap" stores each
        ResBlock's input and first convolution's output only and recomputes the norms in
        backward (paper preset, 64^3, CPU: ~41% of the baseline's training peak at the
        baseline's speed); "blocks" also recomputes the convolutions (~33%, slower).
    channels_last: keep convolution weights and the input in torch.channels_last_3d.
    slab_planes (attribute): without gradients, the fused network runs its large levels slab
        by slab along depth, this many planes at a time (nn/streaming.py: about half the
        memory of the whole-tensor forward, the same result within float32 rounding);
        None runs every level whole. slab_min_bytes (attribute, None: streaming.MIN_BYTES):
        levels whose tensors are smaller run whole (a probe of a large volume lowers it, so
        that it runs the levels in slabs as the volume will). The slab pass calls the
        convolutions' weights directly: forward hooks on those Conv3d modules do not run
        there (slab_planes = None keeps them).

    x: (B, in_channels, D, H, W) with D, H, W multiples of 2^(levels-1); timesteps: (B,)
    integer or float (or a scalar for all). Returns (B, out_channels, D, H, W).
    """

    def __init__(self, config: UNetConfig | None = None, *, fused: bool = True,
                 checkpoint: str | Sequence[str] = "off", channels_last: bool = False, **overrides):
        super().__init__()
        config = (config or PAPER).replace(**overrides) if overrides else (config or PAPER)
        self.config, self.fused = config, fused
        self.channels_last = channels_last
        self.slab_planes: int | None = streaming.SLAB_PLANES
        self.slab_min_bytes: int | None = None
        modes = _per_level(checkpoint, config.levels)
        mc, groups, emb_ch = config.model_channels, config.groups, 4 * config.model_channels
        resblock = partial(ResBlock, emb_channels=emb_ch, groups=groups, dropout=config.dropout, fused=fused)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        self.input_blocks = nn.ModuleList([nn.ModuleList([_conv3(config.in_channels, mc, fused=fused)])])
        skip_channels, ch = [mc], mc
        for level, c in enumerate(config.level_channels):
            for _ in range(config.num_res_blocks):
                self.input_blocks.append(nn.ModuleList([resblock(ch, c, checkpoint=modes[level])]))
                ch = c
                skip_channels.append(ch)
            if level < config.levels - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([resblock(ch, ch, checkpoint=modes[-1]) for _ in range(2)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.levels)):
            for i in range(config.num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                assert skip_ch == ch  # the averaging needs equal channels; the plan guarantees it
                ch = skip_channels[-1] if skip_channels else mc
                block = nn.ModuleList([resblock(skip_ch, ch, checkpoint=modes[level])])
                if level > 0 and i == config.num_res_blocks:
                    block.append(Upsample(ch, fused=fused, checkpoint=modes[level - 1]))
                self.output_blocks.append(block)

        self.out = OutputHead(ch, config.out_channels, groups, fused=fused, checkpoint=modes[0])
        # As the original (guided-diffusion's zero_module): every ResBlock starts as the
        # identity and the network predicts zero noise until trained.
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.out_layers[3].weight)
                nn.init.zeros_(module.out_layers[3].bias)
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    # -- options that can change after construction ------------------------------------------
    def set_checkpoint(self, checkpoint: str | Sequence[str]) -> "UNet3D":
        """Changes the activation checkpointing (same argument as the constructor)."""
        modes = _per_level(checkpoint, self.config.levels)
        for level, blocks in self._blocks_by_level():
            for block in blocks:
                block.checkpoint = modes[level]
        return self

    def _blocks_by_level(self):
        """(level, modules that take a checkpoint mode) for every level."""
        cfg = self.config
        by_level = {level: [] for level in range(cfg.levels)}
        index = 1  # input_blocks.0 is the input convolution
        for level in range(cfg.levels):
            for _ in range(cfg.num_res_blocks):
                by_level[level].append(self.input_blocks[index][0])
                index += 1
            if level < cfg.levels - 1:
                index += 1  # the downsampling
        by_level[cfg.levels - 1].extend(self.middle_block)
        for k, block in enumerate(self.output_blocks):
            level = cfg.levels - 1 - k // (cfg.num_res_blocks + 1)
            by_level[level].append(block[0])
            if len(block) > 1:
                by_level[level - 1].append(block[1])
        by_level[0].append(self.out)
        return by_level.items()

    @property
    def checkpoint_modes(self) -> tuple[str, ...]:
        return tuple(blocks[0].checkpoint for _, blocks in self._blocks_by_level())

    # -- forward --------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Raises ValueError/TypeError when the network cannot take these inputs."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"UNet3D: x must be a 5-D tensor (B, {cfg.in_channels}, D, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"UNet3D: x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet3D: x has {x.shape[1]} channels, the network takes "
                             f"{cfg.in_channels} (shape {tuple(x.shape)})")
        multiple = cfg.size_multiple
        bad = [s for s in x.shape[2:] if s <= 0 or s % multiple]
        if bad:
            raise ValueError(f"UNet3D: spatial size {tuple(x.shape[2:])} must be positive multiples of "
                             f"{multiple} = 2^{cfg.levels - 1} ({cfg.levels} levels, one halving per "
                             f"downsampling)")
        if not isinstance(timesteps, torch.Tensor):
            raise TypeError(f"UNet3D: timesteps must be a tensor of shape ({x.shape[0]},), got "
                            f"{type(timesteps).__name__}")
        if timesteps.dim() > 1 or (timesteps.dim() == 1 and timesteps.shape[0] != x.shape[0]):
            raise ValueError(f"UNet3D: timesteps must have shape ({x.shape[0]},) (one per batch "
                             f"element) or be a scalar, got {tuple(timesteps.shape)}")
        if timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError(f"UNet3D: timesteps must be integer or float, got {timesteps.dtype}")
        if timesteps.device != x.device:
            raise ValueError(f"UNet3D: timesteps are on {timesteps.device} but x is on {x.device}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.check_input(x, timesteps)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        # The sinusoids are computed in float32 and then take the weights' dtype, so that a
        # model cast with .to(torch.bfloat16) or .half() runs (autocast casts on its own).
        frequencies = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(frequencies.to(self.time_embed[0].weight.dtype))

        # Without gradients the large levels run slab by slab (nn/streaming.py); the input
        # convolution's output, the first skip, is then recomputed when the decoder needs it
        # instead of kept through the whole pass. The full-resolution tensors' bytes are
        # reckoned in x's dtype (under autocast they take half).
        level0_bytes = x.shape[0] * self.config.model_channels * x[0, 0].numel() * x.element_size()
        slabs = self.fused and not torch.is_grad_enabled() and self._streams(x.shape[2], level0_bytes)
        input_conv = self.input_blocks[0][0]
        h = input_conv(x)
        skips = [streaming.RecomputedConv(input_conv, x) if slabs else h]
        for (layer,) in self.input_blocks[1:]:
            if not isinstance(layer, ResBlock):
                h = layer(h)
            else:
                h = self._block_in_slabs(layer, [h, None], emb) if slabs else layer(h, emb)
            skips.append(h)
        for block in self.middle_block:
            h = self._block_in_slabs(block, [h, None], emb) if slabs else block(h, emb)
        for block in self.output_blocks:
            # Hand h and the skip over without keeping a reference here, so that the block
            # frees them once averaged (called directly, so Module.__call__ holds none either).
            inputs = [h, skips.pop()]
            del h
            if slabs:
                h = self._block_in_slabs(block[0], inputs, emb)
            else:
                h = block[0].consume(inputs, emb, overwrite=True)
            if len(block) > 1:
                h = block[1](h)
        if slabs and self._streams(h.shape[2], h.nbytes):
            return streaming.head(self.out, h, self.slab_planes)
        return self.out(h)

    def _streams(self, depth: int, nbytes: int) -> bool:
        return streaming.streams(depth, nbytes, self.slab_planes, self.slab_min_bytes)

    def _block_in_slabs(self, block: ResBlock, inputs: list, emb: torch.Tensor) -> torch.Tensor:
        """A ResBlock of the slab pass: in slabs where its level streams, else whole."""
        if self._streams(inputs[0].shape[2], inputs[0].nbytes) and streaming.block_fits(block):
            return streaming.resblock(block, inputs, emb, self.slab_planes)
        if isinstance(inputs[1], streaming.RecomputedConv):
            inputs[1] = inputs[1].full()
        return block.consume(inputs, emb, overwrite=True)


def paper_unet(**options) -> UNet3D:
    """The paper's network (29 channels, channel_mult 1,3,4,4,4,4,4, 2 ResBlocks per level,
    8 input channels, 1 output, 24,260,299 parameters). options: those of UNet3D."""
    return UNet3D(PAPER, **options)


def small_unet(**options) -> UNet3D:
    """The small preset for CPU runs (8 channels, channel_mult 1,2,4,4). options: of UNet3D."""
    return UNet3D(SMALL, **options)
