"""The U-Net's architecture as plain data: what a checkpoint stores to rebuild the network.

Execution choices that do not change the weights (fused ops or plain PyTorch, activation
checkpointing, memory format) are options of UNet3D, not part of the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of PatchDDM's 3D diffusion U-Net.

    model_channels: channels of level 0; level l has model_channels * channel_mult[l].
    channel_mult: one multiplier per level; every level but the last ends in a downsampling.
    num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
    in_channels: 8 in the paper: 4 MR sequences, 3 coordinate channels, x_t.
    out_channels: 1 in the paper: the predicted noise of the mask channel.
    groups: GroupNorm groups, dividing every level's channel count (None: model_channels,
        as in the paper).
    dropout: dropout rate inside the ResBlocks (0 in the paper).
    """

    model_channels: int = 29
    channel_mult: tuple[int, ...] = (1, 3, 4, 4, 4, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 8
    out_channels: int = 1
    groups: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.groups is None:
            object.__setattr__(self, "groups", self.model_channels)
        for name in ("model_channels", "num_res_blocks", "in_channels", "out_channels", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"UNetConfig: {name} must be a positive integer, got {value!r}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"UNetConfig: channel_mult must be non-empty positive integers, "
                             f"got {self.channel_mult}")
        for channels in self.level_channels:
            if channels % self.groups:
                raise ValueError(f"UNetConfig: groups={self.groups} does not divide the {channels} "
                                 f"channels of a level (level channels {self.level_channels})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this: one halving per downsampling."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)


# The paper's network (Bieder et al., MIDL 2023): 24,260,299 parameters.
PAPER = UNetConfig()

# For CPU runs: the same block layout (2 ResBlocks per level, averaging skips, groups =
# model_channels) with 8 channels and 4 levels, so a 32^3 patch reaches 4^3 at the bottom and
# a training step takes a fraction of a second on 2 cores. See the README for the figures.
SMALL = UNetConfig(model_channels=8, channel_mult=(1, 2, 4, 4))

PRESETS: dict[str, UNetConfig] = {"paper": PAPER, "small": SMALL}
