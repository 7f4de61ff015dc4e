"""FusedGroupNormSiLU and fuse_group_norm_silu on a model written without this package."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nn_helpers import randomize, relative_error
from patchddm_fast.nn import FusedGroupNormSiLU, GroupNorm32, fuse_group_norm_silu


class ConvBlock(nn.Module):
    """A residual block as other 3D networks write it: norm/act/conv stages in Sequentials."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.first = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, padding=1))
        self.second = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(inplace=True), nn.Dropout(0.0),
                                    nn.Conv3d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.second(self.first(x))


class ScaledGroupNorm(nn.GroupNorm):
    """A GroupNorm subclass computing something else: must not be fused."""

    def forward(self, x):
        return 2 * super().forward(x)


class ThirdPartyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(8, 8, 4), ConvBlock(8, 12, 4))
        self.fp32_norm = nn.Sequential(GroupNorm32(3, 12), nn.SiLU())     # fused (as guided-diffusion's)
        self.relu_head = nn.Sequential(nn.GroupNorm(3, 12), nn.ReLU())     # not SiLU: left alone
        self.subclass = nn.Sequential(ScaledGroupNorm(3, 12), nn.SiLU())   # unknown forward: left alone
        self.loose_norm = nn.GroupNorm(3, 12)                              # not in a Sequential:
        self.loose_act = nn.SiLU()                                         # order unknown, left alone
        self.head = nn.Sequential(nn.Conv3d(12, 12, 1), nn.GroupNorm(4, 12))  # norm last: nothing follows

    def forward(self, x):
        h = self.blocks(self.stem(x))
        h = self.relu_head(self.fp32_norm(h)) + self.subclass(h)
        return self.head(self.loose_act(self.loose_norm(h)))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad


def test_fusing_a_third_party_model_keeps_outputs_gradients_and_keys():
    model = randomize(ThirdPartyNet())
    original = copy.deepcopy(model)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    parameters = list(model.parameters())

    assert fuse_group_norm_silu(model) == 5  # 2 per ConvBlock + the GroupNorm32 one
    fused = [name for name, m in model.named_modules() if isinstance(m, FusedGroupNormSiLU)]
    assert sorted(fused) == ["blocks.0.first.0", "blocks.0.second.0", "blocks.1.first.0",
                             "blocks.1.second.0", "fp32_norm.0"]
    assert type(model.relu_head[0]) is nn.GroupNorm and type(model.subclass[0]) is ScaledGroupNorm
    assert type(model.loose_norm) is nn.GroupNorm and type(model.head[1]) is nn.GroupNorm
    # Same parameter objects (an optimizer built before fusing keeps working), same keys.
    assert list(model.parameters()) == parameters
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    model.load_state_dict(original.state_dict())

    x = torch.randn(2, 2, 5, 6, 4)
    out, grads, grad_x = _step(model, x)
    ref_out, ref_grads, ref_grad_x = _step(original, x)
    # Fused against unfused float32 GroupNorm + SiLU: statistics over at most a few hundred
    # elements summed in another order, a few ulps (1e-7) per value; 1e-5 leaves a wide margin
    # for the gradients' longer sums.
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(grad_x, ref_grad_x) < 1e-5
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name

    assert fuse_group_norm_silu(model) == 0  # nothing left to fuse


def test_fused_module_has_the_keys_and_parameters_of_group_norm():
    norm = nn.GroupNorm(3, 6)
    fused = FusedGroupNormSiLU(3, 6)
    assert fused.state_dict().keys() == norm.state_dict().keys() == {"weight", "bias"}
    assert FusedGroupNormSiLU(3, 6, affine=False).state_dict().keys() == nn.GroupNorm(3, 6, affine=False).state_dict().keys()
    randomize(norm)
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(2, 6, 3, 4, 5)
    # As above: float32 statistics in another summation order.
    assert relative_error(fused(x), F.silu(norm(x))) < 1e-5
    shared = FusedGroupNormSiLU.from_group_norm(norm)
    assert shared.weight is norm.weight and shared.bias is norm.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_module_with_bias_and_skip(dtype):
    fused = randomize(FusedGroupNormSiLU(2, 4))
    x, skip = torch.randn(2, 4, 3, 3, 3, dtype=dtype), torch.randn(2, 4, 3, 3, 3, dtype=dtype)
    add = torch.randn(2, 4)
    average, y = fused(x, add=add, skip=skip)
    assert average.dtype == y.dtype == dtype
    expected_average = ((x.float() + skip.float()) / 2)
    expected = F.silu(F.group_norm(average.float() + add[..., None, None, None], 2, fused.weight, fused.bias))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(average, expected_average) < tol
    assert relative_error(y, expected) < tol


def test_bad_group_count_is_refused():
    with pytest.raises(ValueError, match="num_groups=4 must divide num_channels=6"):
        FusedGroupNormSiLU(4, 6)
