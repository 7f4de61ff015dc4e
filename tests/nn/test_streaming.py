"""The no-grad forward in slabs of depth planes (nn/streaming.py) against the whole-tensor one."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from nn_helpers import TINY, inputs, norm_error, randomize, relative_error, twin
from patchddm_fast.diffusion.memory import LiveTensorBytes
from patchddm_fast.nn import PAPER, UNet3D
from patchddm_fast.nn import streaming


DEFAULT_MIN_BYTES = streaming.MIN_BYTES


@pytest.fixture(autouse=True)
def _small_tensors_in_slabs_too(monkeypatch):
    # The networks here are tiny: in use, tensors under MIN_BYTES run whole.
    monkeypatch.setattr(streaming, "MIN_BYTES", 0)


@pytest.fixture(scope="module")
def model():
    return randomize(UNet3D(TINY)).eval()


def _forward(model, x, t, planes):
    model.slab_planes = planes
    try:
        with torch.no_grad():
            return model(x, t)
    finally:
        model.slab_planes = streaming.SLAB_PLANES


# The slabs change summation order only (statistics from per-slab sums, the convolution of a
# slab instead of the volume, the norm's affine map folded into scale and shift): measured
# 3.6e-7 to 4.4e-7 relative on the TINY model in float32 (AMD EPYC, Zen 4), the size of the
# whole forward's own float32 rounding. 1e-5 leaves a margin of over 20x for other CPUs'
# convolution kernels (as for the memory options in test_unet.py); a wrong plane, statistic
# or residual is order 1e-2 or more.
FLOAT32_TOL = 1e-5


@pytest.mark.parametrize("planes", [1, 2, 3])
@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 8, 20), (20, 12, 8)], ids=str)
def test_slabs_equal_the_whole_forward(model, planes, shape):
    # (12, 8, 20) with 3 planes: a last slab of fewer planes; 20 planes with 1: every plane alone.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((2, TINY.in_channels) + shape, generator=generator)
    t = torch.tensor([10, 900])
    whole = _forward(model, x, t, None)
    assert streaming.streams(shape[0], 0, planes)
    assert relative_error(_forward(model, x, t, planes), whole) < FLOAT32_TOL


def test_slabs_in_channels_last(model):
    x, t, _ = inputs(TINY, size=16)
    cl = twin(model, channels_last=True).eval()
    out = _forward(cl, x, t, 2)
    assert relative_error(out, _forward(model, x, t, None)) < FLOAT32_TOL


def test_slabs_under_bf16_autocast(model):
    x, t, _ = inputs(TINY, size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole, slabs = _forward(model, x, t, None), _forward(model, x, t, 2)
    reference = _forward(model, x, t, None)
    assert slabs.dtype == whole.dtype == torch.bfloat16
    # Both round every stored tensor to bfloat16 (8 bits), where the slab statistics' last
    # bits may tip a rounding the other way: measured 7e-3 between them, 8.7e-3 of either to
    # float32. The bound is the one the fused and baseline networks meet under autocast.
    assert norm_error(slabs.float(), whole.float()) < 0.03
    assert norm_error(slabs.float(), reference) < 0.03


def test_slabs_in_float64(model):
    x, t, _ = inputs(TINY, size=16)
    double = twin(model).double().eval()
    whole, slabs = _forward(double, x.double(), t, None), _forward(double, x.double(), t, 2)
    assert slabs.dtype == torch.float64
    # float64 rounding (1e-16) a dozen layers deep; float32 leaking in would show as 1e-7.
    assert relative_error(slabs, whole) < 1e-12


def test_the_callers_input_is_left_alone(model):
    x, t, _ = inputs(TINY, size=16)
    before = x.clone()
    _forward(model, x, t, 2)
    assert torch.equal(x, before)


def test_with_gradients_or_dropout_the_whole_forward_runs(model, monkeypatch):
    calls = []
    monkeypatch.setattr(streaming, "resblock", lambda *a, **k: calls.append(1))
    x, t, _ = inputs(TINY, size=16)
    model.slab_planes = 2
    try:
        model(x, t)  # gradients recorded: slabs would save nothing for backward
        dropout = twin(model).train()  # TINY has no dropout; give it some
        for block in dropout.modules():
            if hasattr(block, "dropout"):
                block.dropout = 0.1
        dropout.slab_planes = 2
        with torch.no_grad():
            dropout(x, t)
    finally:
        model.slab_planes = streaming.SLAB_PLANES
    assert calls == []


def _counted_peak(config, size, planes, precision="float32", fused=True):
    """Live-tensor peak of a no-grad forward on fake tensors (exact: shapes only; the
    weights and the input are not counted)."""
    with FakeTensorMode():
        model = UNet3D(config, fused=fused).eval()
        model.slab_planes = planes
        x = torch.empty((1, config.in_channels) + (size,) * 3)
        t = torch.zeros(1, dtype=torch.int64)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
        with LiveTensorBytes(list(model.parameters()) + [x, t], fake_tensors=True) as tracker, \
                torch.no_grad(), amp:
            out = model(x, t)
            del out
        return tracker.peak


def test_counted_memory_of_the_slabs():
    # TINY, one ResBlock per level: the whole forward's peak is 4 full-size tensors (input,
    # norm output and convolution output of a decoder block, and the skip still stacked). In
    # slabs at most 2 are: the upsampled decoder input and the skip it averages (the first
    # skip is recomputed), plus the parity upsampling's temporaries (the padded half-size
    # input, 0.27, and one output parity, 0.125); the slabs' own temporaries are smaller.
    unit = TINY.model_channels * 64 ** 3 * 4
    assert _counted_peak(TINY, 64, None) / unit == pytest.approx(4.0, abs=0.01)
    assert _counted_peak(TINY, 64, 8) / unit < 2.0 + 0.27 + 0.125 + 0.01


def test_counted_memory_of_the_paper_network_meets_its_goals(monkeypatch):
    # The goals of the lean sampling pass, counted exactly at the paper's 128^3 against the
    # original's computation (the plain network) in float32: ours at most 0.6 of its peak in
    # float32 and 0.35 under bfloat16 autocast, with the default choice of levels.
    monkeypatch.setattr(streaming, "MIN_BYTES", DEFAULT_MIN_BYTES)
    original = _counted_peak(PAPER, 128, None, fused=False)
    assert _counted_peak(PAPER, 128, streaming.SLAB_PLANES) <= 0.6 * original
    assert _counted_peak(PAPER, 128, streaming.SLAB_PLANES, "bfloat16") <= 0.35 * original
