"""nn.conv.Conv3d: the fused U-Net's convolution, whose CPU training takes the forward and input
gradient from patchddm's Winograd kernel (bfloat16 and float32) and the bfloat16 weight
gradient from its weight gradient kernel where those pay, and is nn.Conv3d everywhere else."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nn_helpers import TINY, inputs, norm_error, randomize, training_step, twin
from patchddm_fast.nn import UNet3D, UNetConfig, conv
from patchddm_fast.ops.conv3d_weight_grad import kernel_available
from patchddm_fast.ops.conv3d_winograd import conv3d_winograd_error_bound
from patchddm_fast.ops.conv3d_winograd import kernel_available as winograd_available

needs_kernel = pytest.mark.skipif(not kernel_available(),
                                  reason="needs the compiled extension and a CPU with AVX512-BF16")
needs_avx512 = pytest.mark.skipif(not winograd_available(torch.float32),
                                  reason="needs the compiled extension and a CPU with AVX-512")
CL = torch.channels_last_3d


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernels' calls, (kernel, shape of its first argument); and answers "no AMX" for
    this CPU, so that the choice is the one made on AVX512-BF16 CPUs also on an AMX machine
    (where the kernels run but are not chosen)."""
    counted = []

    def spy(name):
        kernel = getattr(conv, name)

        def call(x, *args):
            counted.append((name, tuple(x.shape)))
            return kernel(x, *args)
        monkeypatch.setattr(conv, name, call)

    for name in ("conv3d_weight_grad", "conv3d_winograd", "conv3d_winograd_input_grad"):
        spy(name)
    monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    return counted


def _pair(cin=6, cout=5, shape=(3, 32, 32), seed=0, **options):
    ours = conv.Conv3d(cin, cout, 3, padding=1, **options)
    plain = nn.Conv3d(cin, cout, 3, padding=1, **options)
    randomize(ours, seed)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, cin, *shape, generator=torch.Generator().manual_seed(seed + 1)).contiguous(memory_format=CL)
    return ours.to(memory_format=CL), plain.to(memory_format=CL), x


def _grad_out(out):
    return torch.linspace(-1, 1, out.numel()).reshape(out.shape)


def _step(module, x, bf16=True):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = module(x)
    (out.float() * _grad_out(out)).sum().backward()
    return out.detach(), x.grad, module.weight.grad, module.bias.grad


def _within_onednn_rounding(ours, theirs):
    # oneDNN rounds its weight and bias gradients to bfloat16: 2^-8 relative; an entry near zero
    # within 2^-8 of the largest, the rounding of the bfloat16 output gradient's sum.
    slack = 2.0 ** -8 * (theirs.abs() + theirs.abs().max())
    return bool(((ours - theirs).abs() <= slack).all())


@needs_kernel
def test_bf16_training_takes_the_weight_gradient_from_the_kernel(calls):
    # 6 -> 5 channels: too few for Winograd; a 32 x 32 plane: the weight gradient kernel's
    ours, plain, x = _pair()
    out, grad_x, grad_weight, grad_bias = _step(ours, x)
    ref_out, ref_grad_x, ref_grad_weight, ref_grad_bias = _step(plain, x)
    assert calls == [("conv3d_weight_grad", (2, 6, 3, 32, 32))]
    # The forward and the input gradient are the same aten calls as autocast's: the same bits.
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad_x)
    assert grad_weight.dtype == torch.float32 and grad_weight.is_contiguous(memory_format=CL)
    assert _within_onednn_rounding(grad_weight, ref_grad_weight) and _within_onednn_rounding(grad_bias, ref_grad_bias)
    # ...and not oneDNN's result: those are whole bfloat16 values, ours keep float32's precision.
    assert torch.equal(ref_grad_weight, ref_grad_weight.bfloat16().float())
    assert not torch.equal(grad_weight, grad_weight.bfloat16().float())


@pytest.mark.parametrize("bf16,cin,cout", [(True, 26, 24), (True, 8, 30), (True, 30, 8), (True, 23, 23),
                                            (False, 17, 16), (False, 8, 20), (False, 15, 15)])
def test_training_takes_winograd_from_24_or_16_channels(bf16, cin, cout, calls):
    if not winograd_available(torch.bfloat16 if bf16 else torch.float32):
        pytest.skip("needs the compiled extension and a CPU with AVX512-BF16 (bfloat16) or AVX-512 (float32)")
    # A 16 x 16 plane: Winograd's where 24 (bfloat16) or 16 (float32) channels or more go into
    # the convolution (the forward's input channels, the input gradient's output channels); too
    # small a plane for the bfloat16 weight gradient kernel, so oneDNN computes that.
    least = 24 if bf16 else 16
    ours, plain, x = _pair(cin, cout, shape=(3, 16, 16))
    out, grad_x, grad_weight, grad_bias = _step(ours, x, bf16=bf16)
    ref_out, ref_grad_x, ref_grad_weight, ref_grad_bias = _step(plain, x, bf16=bf16)
    expected = [("conv3d_winograd", (2, cin, 3, 16, 16))] if cin >= least else []
    expected += [("conv3d_winograd_input_grad", (2, cout, 3, 16, 16))] if cout >= least else []
    assert calls == expected
    # Each Winograd result within its error bound of the exact convolution of the same operands
    # (autocast's bfloat16 ones, or float32's); the others are oneDNN's, the same bits as the
    # plain module's.
    dtype = torch.bfloat16 if bf16 else torch.float32
    xb, wb, bb = x.to(dtype), ours.weight.to(dtype), ours.bias.to(dtype)
    if cin >= least:
        exact = torch.nn.functional.conv3d(xb.double(), wb.double(), bb.double(), padding=1)
        assert ((out.double() - exact).abs() <= conv3d_winograd_error_bound(xb, wb, bb)).all()
    else:
        assert torch.equal(out, ref_out)
    if cout >= least:
        grad_out = _grad_out(out).to(dtype)  # what the backward passes (autocast's rounded to bfloat16)
        flipped = wb.flip(2, 3, 4).transpose(0, 1)
        exact = torch.nn.functional.conv3d(grad_out.double(), flipped.double(), padding=1)
        assert ((grad_x.double() - exact).abs() <= conv3d_winograd_error_bound(grad_out, flipped)).all()
        assert grad_x.dtype == torch.float32
    else:
        assert torch.equal(grad_x, ref_grad_x)
    # The weight gradient: oneDNN's from the same input and output gradient (exactly the plain
    # module's where the forward was the same, within its rounding where Winograd's output
    # rounded differently: the weight gradient does not depend on the forward's output).
    assert _within_onednn_rounding(grad_weight, ref_grad_weight) and _within_onednn_rounding(grad_bias, ref_grad_bias)


@needs_kernel
@pytest.mark.parametrize("case", ["float64", "small plane", "stride 2", "eval", "onednn chosen", "AMX"])
def test_everywhere_else_it_is_nn_conv3d(case, calls, monkeypatch):
    options = {"stride": 2} if case == "stride 2" else {}
    # 24 -> 24 channels on a 32 x 32 plane would take all three kernels; below 16 x 16 none
    ours, plain, x = _pair(24, 24, shape=(3, 8, 16) if case == "small plane" else (3, 32, 32), **options)
    if case == "float64":
        ours, plain, x = ours.double(), plain.double(), x.double()
    if case == "onednn chosen":
        monkeypatch.setattr(conv, "weight_grad_choice", "onednn")
        monkeypatch.setattr(conv, "winograd_choice", "onednn")
    if case == "AMX":
        monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    if case == "eval":  # sampling: the kernels are for training
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours.eval()(x), plain.eval()(x))
    else:
        results = _step(ours, x, bf16=case != "float64"), _step(plain, x, bf16=case != "float64")
        assert all(torch.equal(a, b) for a, b in zip(*results))
    assert calls == []


@pytest.mark.parametrize("flags,available,says", [
    ({"avx512_bf16"}, True, "patchddm's Winograd kernel from 24 channels"),
    ({"avx512_bf16", "amx_bf16"}, True, "has AMX"), (set(), False, "no AVX-512 or AVX512-BF16")])
def test_without_the_kernels_or_with_amx_it_is_nn_conv3d_and_says_so(flags, available, says, monkeypatch):
    # What a CPU without AVX512-BF16 (or with AMX) gets, on any machine: oneDNN's convolutions,
    # and `patchddm info` says why.
    monkeypatch.setattr(conv, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(conv, "weight_grad_available", lambda: available)
    monkeypatch.setattr(conv, "winograd_available", lambda dtype: available)
    status, chosen = conv.conv_status(), says.startswith("patchddm")
    if chosen:
        assert says in status and "patchddm's Winograd kernel from 16 channels" in status
        assert "weight gradient: patchddm's kernel from 1024-voxel planes" in status
    else:  # all three say why
        assert status.count(says) == 3
    ours, plain, x = _pair(24, 24)
    assert conv.uses_weight_grad_kernel(ours, x, torch.bfloat16) == chosen
    assert conv.uses_winograd(ours, x, torch.bfloat16) == chosen
    assert conv.uses_winograd(ours, x, torch.float32) == chosen
    if not chosen:
        for bf16 in (True, False):
            assert all(torch.equal(a, b) for a, b in zip(_step(ours, x, bf16), _step(plain, x, bf16)))


def test_same_parameters_and_state_dict_as_nn_conv3d():
    ours, plain, _ = _pair()
    assert isinstance(ours, nn.Conv3d)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    model = UNet3D(TINY, fused=True)
    assert model.state_dict().keys() == UNet3D(TINY, fused=False).state_dict().keys()
    assert any(type(m) is conv.Conv3d for m in model.modules())
    assert not any(type(m) is conv.Conv3d for m in UNet3D(TINY, fused=False).modules())


def _unet(config, size, checkpoint):
    """(fused channels_last U-Net with random weights in training mode, x, t, target)."""
    baseline = randomize(UNet3D(config, fused=True, channels_last=True)).train()
    model = twin(baseline, fused=True, channels_last=True, checkpoint=checkpoint).to(memory_format=CL)
    x, t, target = inputs(config, size=size, batch=1)
    return model, x.contiguous(memory_format=CL), t, target


@needs_kernel
@pytest.mark.parametrize("checkpoint", ["off", "cheap", "blocks"])
def test_unet_bf16_step_uses_it_and_matches_onednn(checkpoint, calls, monkeypatch):
    model, x, t, target = _unet(TINY, 32, checkpoint)
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


# 24 and 48 channels: Winograd's at 16^3 (16 x 16 planes), oneDNN's at 8^3.
WIDE = UNetConfig(model_channels=24, channel_mult=(1, 2), num_res_blocks=1, in_channels=3, out_channels=2, groups=4)


@needs_kernel
@pytest.mark.parametrize("checkpoint", ["off", "cheap", "blocks"])
def test_unet_bf16_step_with_winograd_matches_onednn(checkpoint, calls, monkeypatch):
    model, x, t, target = _unet(WIDE, 16, checkpoint)
    ours = training_step(model, x, t, target, bf16=True)
    kernels = {name for name, _ in calls}
    monkeypatch.setattr(conv, "winograd_choice", "onednn")
    monkeypatch.setattr(conv, "weight_grad_choice", "onednn")
    calls.clear()
    theirs = training_step(model, x, t, target, bf16=True)
    assert calls == [] and kernels == {"conv3d_winograd", "conv3d_winograd_input_grad"}
    exact = training_step(model, x, t, target, bf16=False)  # float32: the step both approximate

    def errors(step):  # relative to each tensor's norm: output, input gradient, parameter gradients
        found = [norm_error(step[0], exact[0]), norm_error(step[2], exact[2])]
        return found + [norm_error(grad, exact[1][name]) for name, grad in step[1].items()]

    # Winograd's rounding (about 3x a direct bfloat16 convolution's, tests/ops) through the
    # network and back: the largest error of any tensor against float32, measured 1.38-1.40x
    # oneDNN's bfloat16 step's (1.3 % against 0.9 %) over these three modes (1.39-1.57x with 16
    # and 32 channels); 2x leaves a margin of 1.3. The step stays about as close to float32 as
    # autocast's; a wrong kernel would not.
    assert max(errors(ours)) <= 2 * max(errors(theirs))


@pytest.mark.parametrize("value,choice,warned", [("onednn", "onednn", False), (" ONEDNN ", "onednn", False),
                                                 ("", "auto", False), ("fast", "auto", True)])
def test_the_environment_chooses_onednn_or_auto(value, choice, warned):
    # Read at import: a fresh interpreter with PATCHDDM_CPU_CONV set.
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from patchddm_fast.nn import conv\n"
            "print(conv.winograd_choice, conv.weight_grad_choice)\n"
            "print(conv.conv_status())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PATCHDDM_CPU_CONV=value))
    assert result.returncode == 0, result.stderr
    choices, status = result.stdout.splitlines()[:2]
    assert choices == f"{choice} {choice}"
    assert (status.count("chosen: 'onednn'") == 3) == (choice == "onednn")
    assert ("PATCHDDM_CPU_CONV='fast' ignored: choose one of auto, onednn" in result.stderr) == warned


@needs_avx512
@pytest.mark.parametrize("checkpoint", ["off", "cheap", "blocks"])
def test_unet_float32_step_with_winograd_matches_onednn(checkpoint, calls, monkeypatch):
    model, x, t, target = _unet(WIDE, 16, checkpoint)
    ours = training_step(model, x, t, target)
    kernels = {name for name, _ in calls}
    monkeypatch.setattr(conv, "winograd_choice", "onednn")
    calls.clear()
    theirs = training_step(model, x, t, target)
    assert calls == [] and kernels == {"conv3d_winograd", "conv3d_winograd_input_grad"}
    # float32 rounding on both sides: every tensor within 6.9e-7 of oneDNN's relative to its
    # norm, measured over these three modes; 1e-5 leaves a margin of 14, and a wrong kernel
    # would be off by order 1.
    errors = [norm_error(ours[0], theirs[0]), norm_error(ours[2], theirs[2])]
    errors += [norm_error(grad, theirs[1][name]) for name, grad in ours[1].items()]
    assert max(errors) < 1e-5
