"""The normalisation modules of the U-Net, and the drop-in fusion for other people's models.

GroupNorm32 is the original's norm (statistics in float32 whatever the input dtype), used by
the plain-PyTorch baseline. FusedGroupNormSiLU computes GroupNorm followed by SiLU with the
fused op, optionally adding a per-(batch, channel) bias and averaging a skip first; it has
the same parameters and state_dict keys as nn.GroupNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import group_norm_silu


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm computed in float32 and returned in the input's dtype (as the original)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters in float32 too, so that a model cast to bfloat16 or float16 still runs.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class FusedGroupNormSiLU(nn.Module):
    """silu(group_norm(x)) in one fused op; replaces nn.GroupNorm followed by nn.SiLU.

    Same constructor arguments, parameters (weight, bias) and state_dict keys as nn.GroupNorm,
    so a checkpoint of the unfused model loads unchanged. forward(x, add=None, skip=None):
    add, a (B, C) tensor, is added per (batch, channel) before normalising; with skip the
    input is first averaged with it, (x + skip) / 2, and (average, y) is returned instead of y.
    Statistics are float32 for every input dtype; the output has x's dtype and memory format.
    On the CPU the fused op computes channels_last(_3d) inputs in their layout, with no copies;
    the CUDA and Triton kernels copy them to contiguous and back (see ops.group_norm_silu).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"FusedGroupNormSiLU: num_groups={num_groups} must divide "
                             f"num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "FusedGroupNormSiLU":
        """A fused module sharing `norm`'s parameters (the same Parameter objects)."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False)
        fused.affine = norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, add=add, skip=skip)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


def norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None,
             skip: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """act(norm(average-or-x + add)) -> (average or None, y), fused or in plain PyTorch.

    With a FusedGroupNormSiLU (whose `act` is an nn.Identity) everything is one op; otherwise
    the original's sequence: (x + skip) / 2, x + add[..., None, None, None], norm, act.
    """
    if isinstance(norm, FusedGroupNormSiLU):
        out = norm(x, add=add, skip=skip)
        return out if skip is not None else (None, out)
    average = None
    if skip is not None:
        x = average = (x + skip) / 2
    if add is not None:
        x = x + add.reshape(add.shape + (1,) * (x.dim() - 2))
    return average, act(norm(x))


def _is_plain_group_norm(module: nn.Module) -> bool:
    # A GroupNorm subclass may change what forward computes; only the plain one and the
    # float32-statistics variant (GroupNorm32, as in guided-diffusion) compute what the fused
    # op computes.
    return isinstance(module, nn.GroupNorm) and (
        type(module).forward is nn.GroupNorm.forward or type(module).__name__ == "GroupNorm32")


def _is_silu(module: nn.Module) -> bool:
    # guided-diffusion's own `SiLU` class (x * sigmoid(x), for old PyTorch) counts too.
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLU"


def fuse_group_norm_silu(model: nn.Module) -> int:
    """Rewrites every GroupNorm -> SiLU pair inside nn.Sequential containers, in place.

    The GroupNorm becomes a FusedGroupNormSiLU holding the same parameters, the SiLU an
    nn.Identity, so indices and state_dict keys stay as they were and a checkpoint of the
    original model still loads. Only consecutive children of one nn.Sequential are fused (the
    only place where "GroupNorm then SiLU" is certain without tracing forward). Returns the
    number of pairs fused.
    """
    fused = 0
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        for i in range(len(container) - 1):
            if _is_plain_group_norm(container[i]) and _is_silu(container[i + 1]):
                container[i] = FusedGroupNormSiLU.from_group_norm(container[i])
                container[i + 1] = nn.Identity()
                fused += 1
    return fused


__all__ = ["FusedGroupNormSiLU", "GroupNorm32", "fuse_group_norm_silu", "norm_act"]
