"""The U-Net on the fused ops against its plain-PyTorch baseline, its memory options, its inputs."""

import pytest
import torch

from nn_helpers import (TINY, assert_same_step, inputs, norm_error, randomize, relative_error, training_step,
                        twin)
from patchddm_fast.nn import SMALL, ResBlock, UNet3D, paper_unet, small_unet


@pytest.fixture(scope="module")
def baseline():
    return randomize(UNet3D(TINY, fused=False)).train()


@pytest.fixture(scope="module")
def baseline_step(baseline):
    return training_step(baseline, *inputs(TINY))


def test_fused_and_baseline_have_the_same_parameters():
    fused, plain = UNet3D(TINY, fused=True), UNet3D(TINY, fused=False)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_fused_matches_baseline_in_output_and_every_gradient(baseline, baseline_step):
    fused = twin(baseline, fused=True)
    assert_same_step(training_step(fused, *inputs(TINY)), baseline_step, 1e-4, "fused vs baseline")


def test_fused_matches_baseline_under_bf16_autocast(baseline):
    x, t, target = inputs(TINY)
    fp32 = training_step(baseline, x, t, target)
    plain = training_step(baseline, x, t, target, bf16=True)
    fused = training_step(twin(baseline, fused=True), x, t, target, bf16=True)
    # The two round to bfloat16 at different places (the fused op once, after the SiLU; the
    # baseline after the norm and again after the SiLU): they agree to bfloat16's precision
    # (8 bits, a few rounding steps deep), measured over whole tensors.
    assert norm_error(fused[0], plain[0]) < 0.03
    assert norm_error(fused[2], plain[2]) < 0.03
    flat = [torch.cat([g.flatten() for g in step[1].values()]) for step in (fused, plain)]
    assert norm_error(*flat) < 0.03
    # A gradient that sums over many voxels (a norm's weight or bias) can lose more to
    # cancellation; the fused one must then be about as close to float32 as the baseline's.
    for name, grad in fused[1].items():
        reference = fp32[1][name]
        assert norm_error(grad, reference) <= 2 * norm_error(plain[1][name], reference) + 0.02, name


# norm_error of a whole forward in a model cast to another dtype, against float32, measured on
# the TINY model with random weights on an AMD EPYC (Zen 4): float64 3.7e-7 (the float32
# reference's own rounding), float16 1.1e-3, bfloat16 9.3e-3 (11 and 8 significand bits, a
# dozen layers deep). The bounds leave a margin of at least 4x for other CPUs' convolution
# kernels; a dtype mistake (a float32 tensor mixed in, a wrong cast) is order 1 or an error.
CAST_TOLERANCES = {torch.float64: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "baseline"])
@pytest.mark.parametrize("dtype", list(CAST_TOLERANCES), ids=str)
def test_a_model_cast_to_another_dtype_runs_in_it(baseline, fused, dtype):
    # model.to(dtype), model.half(), model.bfloat16(): the timestep embedding and the norms'
    # parameters must follow the weights.
    x, t, _ = inputs(TINY)
    with torch.no_grad():
        reference = baseline.eval()(x, t)
        cast = {torch.float16: lambda m: m.half(), torch.bfloat16: lambda m: m.bfloat16()}.get(
            dtype, lambda m: m.to(dtype))
        model = cast(twin(baseline, fused=fused).eval())
        out = model(x.to(dtype), t)
    baseline.train()
    assert out.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    error = norm_error(out, reference)
    print(f"{dtype} {'fused' if fused else 'baseline'}: {error:.2e}")
    assert error < CAST_TOLERANCES[dtype]


MEMORY_OPTIONS = {
    "cheap": dict(checkpoint="cheap"),
    "blocks": dict(checkpoint="blocks"),
    "per-level": dict(checkpoint=("cheap", "blocks", "off")),
    "channels_last": dict(channels_last=True),
    "cheap+channels_last": dict(checkpoint="cheap", channels_last=True),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "baseline"])
@pytest.mark.parametrize("option", MEMORY_OPTIONS)
def test_memory_options_change_neither_output_nor_gradients(baseline, fused, option):
    x, t, target = inputs(TINY)
    off = training_step(twin(baseline, fused=fused), x, t, target)
    model = twin(baseline, fused=fused, **MEMORY_OPTIONS[option])
    # Recomputation repeats the same operations (exact); channels_last changes the
    # convolutions' summation order (a few float32 ulps, more in sums that cancel).
    tol = 1e-4 if "channels_last" in option else 1e-5
    assert_same_step(training_step(model, x, t, target), off, tol, option)
    # The options act while gradients are recorded; inference is the same either way.
    with torch.no_grad():
        assert relative_error(model(x, t), off[0]) < tol


def test_set_checkpoint_changes_the_mode_of_every_level():
    model = UNet3D(TINY)
    assert model.checkpoint_modes == ("off",) * 3
    model.set_checkpoint(("blocks", "off", "cheap"))
    assert model.checkpoint_modes == ("blocks", "off", "cheap")
    assert model.out.checkpoint == "blocks" and model.middle_block[0].checkpoint == "cheap"
    with pytest.raises(ValueError, match="one per level"):
        model.set_checkpoint(("cheap", "off"))
    with pytest.raises(ValueError, match="'sometimes'"):
        UNet3D(TINY, checkpoint="sometimes")


@pytest.mark.parametrize("checkpoint", ["off", "cheap", "blocks"])
def test_dropout_masks_are_the_same_in_forward_and_recomputation(checkpoint):
    # With dropout, the recomputation in backward must draw the mask of the forward pass;
    # gradcheck with the RNG reseeded per call catches a mask that differs.
    block = ResBlock(2, 4, emb_channels=3, groups=2, dropout=0.5, fused=True, checkpoint=checkpoint)
    randomize(block).double().train()
    x = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)

    def run(x, emb):
        torch.manual_seed(3)
        return block(x, emb)

    dropped = (run(x, emb) - run(x, emb)).abs().max()
    assert dropped == 0  # reseeding makes it deterministic
    assert torch.autograd.gradcheck(run, (x, emb), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("checkpoint", ["off", "cheap"])
def test_decoder_block_with_skip_has_correct_gradients(checkpoint):
    # The averaging skip fused into the first norm (and, with "cheap", into the recomputation),
    # in float64 (the baseline cannot: its norm computes in float32 as the original's).
    block = randomize(ResBlock(4, 2, emb_channels=3, groups=2, fused=True, checkpoint=checkpoint)).double()
    args = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
            for shape in ((1, 4, 2, 3, 2), (1, 3), (1, 4, 2, 3, 2))]
    assert torch.autograd.gradcheck(lambda x, e, s: block(x, e, skip=s), args, eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_timesteps_may_be_integer_float_or_a_scalar(baseline):
    x, t, _ = inputs(TINY)
    model = twin(baseline, fused=True).eval()
    with torch.no_grad():
        reference = model(x, t)
        assert torch.equal(model(x, t.float()), reference)
        same = torch.full((2,), 17)
        assert torch.equal(model(x, torch.tensor(17)), model(x, same))


def test_presets():
    assert sum(p.numel() for p in paper_unet().parameters()) == 24_260_299
    model = small_unet()
    assert model.config == SMALL
    x, t, _ = inputs(SMALL, size=SMALL.size_multiple, batch=1)
    with torch.no_grad():
        assert model(x, t).shape == (1, SMALL.out_channels) + x.shape[2:]


class CallRecorder:
    """Records every submodule that starts computing."""

    def __init__(self, model):
        self.called = []
        for name, module in model.named_modules():
            module.register_forward_pre_hook(lambda m, args, name=name: self.called.append(name))


BAD_INPUTS = {
    "spatial size": (lambda: torch.randn(1, 3, 8, 6, 8), r"spatial size \(8, 6, 8\) must be positive multiples of 4"),
    "channels": (lambda: torch.randn(1, 4, 8, 8, 8), "x has 4 channels, the network takes 3"),
    "dimensions": (lambda: torch.randn(3, 8, 8, 8), r"5-D tensor \(B, 3, D, H, W\)"),
    "dtype": (lambda: torch.ones(1, 3, 8, 8, 8, dtype=torch.int64), "floating-point"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_before_any_computation(case):
    make, message = BAD_INPUTS[case]
    model = UNet3D(TINY)
    recorder = CallRecorder(model)
    x = make()
    with pytest.raises((ValueError, TypeError), match=message):
        model(x, torch.zeros(x.shape[0], dtype=torch.int64))
    assert recorder.called == [""]  # the top-level forward only


def test_bad_timesteps_are_refused():
    model = UNet3D(TINY)
    x = torch.randn(2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        model(x, torch.zeros(3))
    with pytest.raises(TypeError, match="timesteps must be a tensor"):
        model(x, [0, 1])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "baseline"])
def test_inference_leaves_the_callers_tensors_alone(fused):
    # The decoder averages in place into tensors it owns; what a caller passes is never written.
    block = randomize(ResBlock(4, 4, emb_channels=3, groups=2, fused=fused)).eval()
    x, skip, emb = torch.randn(1, 4, 2, 3, 2), torch.randn(1, 4, 2, 3, 2), torch.randn(1, 3)
    copies = [t.clone() for t in (x, skip, emb)]
    with torch.no_grad():
        out = block(x, emb, skip=skip)
        model = randomize(UNet3D(TINY, fused=fused)).eval()
        inputs_ = inputs(TINY)[:2]
        before = inputs_[0].clone()
        model(*inputs_)
    assert all(torch.equal(a, b) for a, b in zip((x, skip, emb), copies))
    assert torch.equal(inputs_[0], before)
    assert relative_error(out, block(x, emb, skip=skip).detach()) < 1e-6  # with gradients: no overwriting
