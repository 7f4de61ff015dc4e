"""nn.conv.Conv3d: the fused U-Net's convolution, whose bfloat16 CPU training takes the weight
gradient from patchddm's kernel where that pays, and is nn.Conv3d everywhere else."""

import contextlib

import pytest
import torch
import torch.nn as nn

from nn_helpers import TINY, inputs, randomize, training_step, twin
from patchddm_fast.nn import UNet3D, conv
from patchddm_fast.ops.conv3d_weight_grad import kernel_available

needs_kernel = pytest.mark.skipif(not kernel_available(),
                                  reason="needs the compiled extension and a CPU with AVX512-BF16")
CL = torch.channels_last_3d


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel's calls; and answers "no AMX" for this CPU, so that the choice is the
    one made on AVX512-BF16 CPUs also on an AMX machine (where the kernel runs but is not chosen)."""
    counted = []
    kernel = conv.conv3d_weight_grad

    def spy(x, grad):
        counted.append(tuple(x.shape))
        return kernel(x, grad)

    monkeypatch.setattr(conv, "conv3d_weight_grad", spy)
    monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    return counted


def _pair(cin=6, cout=5, shape=(3, 32, 32), seed=0, **options):
    ours = conv.Conv3d(cin, cout, 3, padding=1, **options)
    plain = nn.Conv3d(cin, cout, 3, padding=1, **options)
    randomize(ours, seed)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, cin, *shape, generator=torch.Generator().manual_seed(seed + 1)).contiguous(memory_format=CL)
    return ours.to(memory_format=CL), plain.to(memory_format=CL), x


def _step(module, x, bf16=True):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = module(x)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return out.detach(), x.grad, module.weight.grad, module.bias.grad


@needs_kernel
def test_bf16_training_takes_the_weight_gradient_from_the_kernel(calls):
    ours, plain, x = _pair()
    out, grad_x, grad_weight, grad_bias = _step(ours, x)
    ref_out, ref_grad_x, ref_grad_weight, ref_grad_bias = _step(plain, x)
    assert calls == [(2, 6, 3, 32, 32)]
    # The forward and the input gradient are the same aten calls as autocast's: the same bits.
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad_x)
    # The weight and bias gradients: float32 layout and dtype of the parameters, within oneDNN's
    # rounding of its own to bfloat16 (2^-8 relative; an entry near zero within 2^-8 of the
    # largest, the rounding of the bfloat16 output gradient's sum).
    assert grad_weight.dtype == torch.float32 and grad_weight.is_contiguous(memory_format=CL)
    for ours_grad, theirs in ((grad_weight, ref_grad_weight), (grad_bias, ref_grad_bias)):
        slack = 2.0 ** -8 * (theirs.abs() + theirs.abs().max())
        assert ((ours_grad - theirs).abs() <= slack).all()
    # ...and not oneDNN's result: those are whole bfloat16 values, ours keep float32's precision.
    assert torch.equal(ref_grad_weight, ref_grad_weight.bfloat16().float())
    assert not torch.equal(grad_weight, grad_weight.bfloat16().float())


@needs_kernel
@pytest.mark.parametrize("case", ["float32", "small plane", "stride 2", "no grad", "onednn chosen", "AMX"])
def test_everywhere_else_it_is_nn_conv3d(case, calls, monkeypatch):
    options = {"stride": 2} if case == "stride 2" else {}
    ours, plain, x = _pair(shape=(3, 16, 32) if case == "small plane" else (3, 32, 32), **options)
    if case == "onednn chosen":
        monkeypatch.setattr(conv, "weight_grad_choice", "onednn")
    if case == "AMX":
        monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    if case == "no grad":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours(x), plain(x))
    else:
        results = _step(ours, x, bf16=case != "float32"), _step(plain, x, bf16=case != "float32")
        assert all(torch.equal(a, b) for a, b in zip(*results))
    assert calls == []


@pytest.mark.parametrize("flags,available,says", [
    ({"avx512_bf16"}, True, "patchddm's kernel where a plane"), ({"avx512_bf16", "amx_bf16"}, True, "has AMX"),
    (set(), False, "no AVX512-BF16")])
def test_without_the_kernel_or_with_amx_it_is_nn_conv3d_and_says_so(flags, available, says, monkeypatch):
    # What a CPU without AVX512-BF16 (or with AMX) gets, on any machine: oneDNN's gradients, and
    # `patchddm info` says why.
    monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(conv, "kernel_available", lambda: available)
    assert says in conv.weight_grad_status()
    ours, plain, x = _pair()
    assert conv.uses_weight_grad_kernel(ours, x, torch.bfloat16) == (says == "patchddm's kernel where a plane")
    if not conv.uses_weight_grad_kernel(ours, x, torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(_step(ours, x), _step(plain, x)))


def test_same_parameters_and_state_dict_as_nn_conv3d():
    ours, plain, _ = _pair()
    assert isinstance(ours, nn.Conv3d)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    model = UNet3D(TINY, fused=True)
    assert model.state_dict().keys() == UNet3D(TINY, fused=False).state_dict().keys()
    assert any(type(m) is conv.Conv3d for m in model.modules())
    assert not any(type(m) is conv.Conv3d for m in UNet3D(TINY, fused=False).modules())


@needs_kernel
@pytest.mark.parametrize("checkpoint", ["off", "cheap", "blocks"])
def test_unet_bf16_step_uses_it_and_matches_onednn(checkpoint, calls, monkeypatch):
    baseline = randomize(UNet3D(TINY, fused=True, channels_last=True)).train()
    model = twin(baseline, fused=True, channels_last=True, checkpoint=checkpoint).to(memory_format=CL)
    x, t, target = inputs(TINY, size=32, batch=1)
    x = x.contiguous(memory_format=CL)
    ours = training_step(model, x, t, target, bf16=True)
    used = len(calls)
    monkeypatch.setattr(conv, "weight_grad_choice", "onednn")
    theirs = training_step(model, x, t, target, bf16=True)
    # The convolutions at 32^3: the input one, two in the encoder's ResBlock, four in the
    # decoder's two, the upsampling's and the output head's (16^3 and 8^3 keep oneDNN's).
    assert used == 9 and len(calls) == used
    assert torch.equal(ours[0], theirs[0])  # the same forward
    # Gradients: bfloat16 rounding through the backward (oneDNN's weight gradients are rounded
    # to bfloat16, ours not, and the difference propagates): relative to each tensor's norm,
    # measured at most 2.1e-3 over these three modes; 2^-6 leaves a margin of seven.
    for name, grad in ours[1].items():
        ref = theirs[1][name]
        assert ((grad - ref).norm() / ref.norm().clamp_min(1e-30)) < 2.0 ** -6, name
