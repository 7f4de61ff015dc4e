"""The decoder's upsampling without gradients: nearest x2 and the 3x3x3 convolution computed per
output parity (patchddm_fast.nn.unet.upsample_conv_by_parity), against the plain pair."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from patchddm_fast.diffusion.memory import LiveTensorBytes
from patchddm_fast.nn.unet import Upsample, upsample_conv_by_parity


def plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def module_and_input(channels=7, shape=(2, 5, 6, 4)):
    """A float32 module and input, and the exact result of the plain pair (float64)."""
    torch.manual_seed(0)
    up = Upsample(channels)
    torch.nn.init.normal_(up.conv.bias)  # not the default's near-zero bias
    x = torch.randn((shape[0], channels) + shape[1:])
    exact = Upsample(channels).double()
    exact.load_state_dict(up.state_dict())
    with torch.no_grad():
        return up, x, plain(x.double(), exact.conv).float()


def test_equals_the_plain_pair_in_float32():
    up, x, exact = module_and_input()
    with torch.no_grad():
        ours, reference = upsample_conv_by_parity(x, up.conv), plain(x, up.conv)
    assert ours.shape == reference.shape == (2, 7, 10, 12, 8) and ours.dtype == torch.float32
    # Both are float32 sums of 7 x 27 products (ours over weights summed first): float32
    # rounding of each from the exact value (float32 tolerances), and so of one from the other.
    assert_close(ours, exact)
    assert_close(reference, exact)
    assert_close(ours, reference)


def test_bfloat16_autocast_and_channels_last():
    up, x, exact = module_and_input()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = upsample_conv_by_parity(x.bfloat16(), up.conv)
        assert ours.dtype == torch.bfloat16  # as the plain convolution under autocast
        assert_close(ours, exact, dtype=torch.bfloat16)  # input, weights and output rounded to bfloat16
        up.to(memory_format=torch.channels_last_3d)
        last = upsample_conv_by_parity(x.contiguous(memory_format=torch.channels_last_3d), up.conv)
    assert last.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(last, exact)


def test_upsample_module_uses_it_without_gradients_only():
    up, x, _ = module_and_input()
    x.requires_grad_()
    with torch.no_grad():
        assert torch.equal(up(x), upsample_conv_by_parity(x, up.conv))
    out = up(x)  # with gradients: the plain pair, and gradients flow
    assert torch.equal(out, plain(x, up.conv))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("channels,edge", [(4, 16), (29, 8)])
def test_holds_the_output_and_one_parity_instead_of_the_upsampled_input(channels, edge):
    # Counted on fake tensors (deterministic): the plain pair holds the upsampled input and the
    # output, 16 times the input's bytes; ours the output (8x), one parity's result (1x), the
    # input padded by one voxel, and the parity's 2x2x2 weights with their einsum temporaries.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        up = Upsample(channels)
        x = torch.empty(1, channels, edge, edge, edge)
        peaks = []
        for run in (upsample_conv_by_parity, plain):
            with torch.no_grad(), LiveTensorBytes(list(up.parameters()) + [x], fake_tensors=True) as tracker:
                out = run(x, up.conv)
                del out
            peaks.append(tracker.peak)
    ours, reference = peaks
    s = x.nbytes
    padded = channels * (edge + 2) ** 3 * 4
    assert reference == 16 * s
    assert 9 * s + padded <= ours <= 9 * s + padded + 8 * up.conv.weight.nbytes
