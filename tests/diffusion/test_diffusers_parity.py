"""Our schedulers against diffusers' own, on random inputs (issue 15).

For every spacing and setting we claim to share: the same timesteps (exactly), and the same
step and add_noise results in float32 up to the tolerance below.

Where the tolerance comes from: diffusers keeps alpha_bar as a float32 cumulative product,
ours is float64 (from the same float32 betas); the two differ by the float32 product's drift,
a random walk of T roundings of half an ulp each (about sqrt(1000) / 2 = 16 ulps; up to 19
seen): SCHEDULE_DRIFT_ULPS = 32 bounds it (asserted in test_schedules_agree). In a step that rounding is magnified
by 1 / sqrt(alpha_bar) in x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) and, near t = 0, by
1 / sqrt(1 - ab) in the noise coefficient (diffusers rounds 1 - ab in float32, an absolute
error of 1 ulp of 1). Both sides also round their own float32 arithmetic (a handful of ulps of
the largest operand). `step_atol` bounds the sum: twice the drift bound, 64 ulps of the largest
operand, times that magnification.
"""

import math

import numpy as np
import pytest
import torch

from patchddm_fast.diffusion import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, NoiseSchedule,
                                     StepOutput)
from patchddm_fast.ops import philox_normal

diffusers = pytest.importorskip("diffusers", reason="the parity tests need diffusers (pip install -e '.[test]')")

# diffusers' DPM-Solver set_timesteps passes a tensor through np.interp: numpy 2 warns (theirs)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ULP = 2.0 ** -24
SCHEDULE_DRIFT_ULPS = 32
SHAPE = (2, 1, 4, 4, 4)
TRAILING_REFUSED = 62  # step counts 1..1000 whose diffusers trailing list is broken (see below)


def step_atol(alpha_bar: float, *tensors) -> float:
    """2 * SCHEDULE_DRIFT_ULPS float32 ulps of the largest operand, magnified by
    1 / sqrt(ab) + 1 / sqrt(1 - ab) (module docstring)."""
    scale = max([1.0] + [float(t.abs().max()) for t in tensors])
    return 2 * SCHEDULE_DRIFT_ULPS * ULP * scale * (1 / math.sqrt(alpha_bar) + 1 / math.sqrt(1 - alpha_bar))


def _inputs(seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 250])
def test_schedules_agree(beta_schedule, T):
    kw = dict(num_train_timesteps=T, beta_schedule=beta_schedule)
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    ours, theirs = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
    # the same float32 betas, bit for bit
    assert torch.equal(ours.betas.float(), theirs.betas)
    drift = ((theirs.alphas_cumprod.double() - ours.alphas_cumprod) / ours.alphas_cumprod).abs().max()
    assert float(drift) <= SCHEDULE_DRIFT_ULPS * ULP
    assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.order == theirs.order


def test_explicit_linear_betas_are_not_scaled_by_1000_over_t():
    # diffusers takes beta_start / beta_end as given for any T; so do we (the named
    # guided-diffusion schedule, NoiseSchedule.from_name, scales them: test_schedule.py)
    ours, theirs = DDPMScheduler(num_train_timesteps=50), diffusers.DDPMScheduler(num_train_timesteps=50)
    assert torch.equal(ours.betas.float(), theirs.betas) and float(theirs.betas[-1]) == pytest.approx(0.02)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_timesteps_are_diffusers_lists_for_every_step_count(kind, spacing):
    make = {"ddim": (DDIMScheduler, diffusers.DDIMScheduler), "ddpm": (DDPMScheduler, diffusers.DDPMScheduler)}[kind]
    offsets = (0, 1) if spacing == "leading" else (0,)
    refused = 0
    for steps_offset in offsets:
        ours, theirs = (cls(timestep_spacing=spacing, steps_offset=steps_offset) for cls in make)
        for n in range(1, 1001):
            theirs.set_timesteps(n)
            expected = theirs.timesteps.tolist()
            if spacing == "leading" and steps_offset and expected[0] >= 1000:
                with pytest.raises(ValueError, match="steps_offset"):
                    ours.set_timesteps(n)
                continue
            if spacing == "trailing" and (len(expected) != n or expected[-1] < 0):
                # diffusers' float arange gives n + 1 entries ending at -1 here: refused, not copied
                with pytest.raises(ValueError, match="no valid list"):
                    ours.set_timesteps(n)
                refused += 1
                continue
            assert ours.set_timesteps(n) is ours  # our set_timesteps chains (diffusers returns None)
            assert ours.timesteps.tolist() == expected and ours.timesteps.dtype == theirs.timesteps.dtype
            assert ours.num_inference_steps == theirs.num_inference_steps
    assert refused == (TRAILING_REFUSED if spacing == "trailing" else 0)


def test_patchddm_spacing_is_its_own_list():
    # the original PatchDDM list differs from diffusers' linspace (ties at .5, and n = 1)
    differ = 0
    theirs = diffusers.DDIMScheduler(timestep_spacing="linspace")
    ours = DDIMScheduler(timestep_spacing="patchddm")
    for n in range(1, 1001):
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        assert ours.timesteps.tolist() == np.round(np.linspace(999, 0, n)).astype(int).tolist()
        differ += ours.timesteps.tolist() != theirs.timesteps.tolist()
    assert differ == 139


def test_patchddm_spacing_ddpm_is_diffusers_ddpm_on_those_timesteps():
    # diffusers' DDPM takes a custom list and steps to the next listed timestep, as our
    # PatchDDM spacing does: given the PatchDDM list, the two agree
    ours = DDPMScheduler(timestep_spacing="patchddm").set_timesteps(6)
    theirs = diffusers.DDPMScheduler()
    theirs.set_timesteps(timesteps=ours.timesteps.tolist())
    for k, t in enumerate(theirs.timesteps):
        x, out, _ = _inputs(k)
        want = theirs.step(out, t, x, torch.Generator().manual_seed(k))
        got = ours.step(out, t, x, torch.Generator().manual_seed(k))
        atol = step_atol(float(ours.alphas_cumprod[int(t)]), x, out, want.pred_original_sample)  # docstring
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=atol)


def _ddim_cases():
    for spacing in ("leading", "trailing", "linspace"):
        for prediction_type in ("epsilon", "sample", "v_prediction"):
            yield spacing, prediction_type


@pytest.mark.parametrize("spacing,prediction_type", list(_ddim_cases()))
def test_ddim_step_matches_diffusers(spacing, prediction_type):
    for clip in (True, False):
        for set_alpha_to_one in (True, False):
            kw = dict(timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=clip,
                      set_alpha_to_one=set_alpha_to_one, steps_offset=1 if spacing == "leading" else 0)
            ours, theirs = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
            assert float(ours.final_alpha_cumprod) == pytest.approx(float(theirs.final_alpha_cumprod), rel=1e-6)
            ours.set_timesteps(7)
            theirs.set_timesteps(7)
            for k, t in enumerate(theirs.timesteps):
                x, out, z = _inputs(k)
                for eta, clipped in ((0.0, False), (0.0, True), (0.6, False), (1.0, True)):
                    want = theirs.step(out, t, x, eta, clipped, variance_noise=z)
                    # eta by position, as diffusers; the noise given as diffusers takes it
                    got = ours.step(out, t, x, eta, clipped, variance_noise=z)
                    ab = float(ours.alphas_cumprod[int(t)])
                    atol = step_atol(ab, x, out, want.pred_original_sample)  # module docstring
                    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=atol)
                    torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=0,
                                               atol=atol)
                    if eta == 0:  # the fused kernel path (no noise to give)
                        fused = ours.step(out, t, x, eta, clipped)
                        torch.testing.assert_close(fused.prev_sample, want.prev_sample, rtol=0, atol=atol)
                        torch.testing.assert_close(fused.pred_original_sample, want.pred_original_sample, rtol=0,
                                                   atol=atol)


def test_ddim_generator_draws_diffusers_noise():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x, eps, _ = _inputs(3)
    t = ours.timesteps[2]
    want = theirs.step(eps, t, x, 0.8, generator=torch.Generator().manual_seed(11))
    got = ours.step(eps, t, x, 0.8, generator=torch.Generator().manual_seed(11))
    atol = step_atol(float(ours.alphas_cumprod[int(t)]), x, eps)  # module docstring
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=atol)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(spacing, variance_type):
    for clip in (True, False):
        for prediction_type in ("epsilon", "sample", "v_prediction"):
            kw = dict(timestep_spacing=spacing, variance_type=variance_type, clip_sample=clip,
                      prediction_type=prediction_type)
            ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
            ours.set_timesteps(6)
            theirs.set_timesteps(6)
            for k, t in enumerate(theirs.timesteps):
                x, out, _ = _inputs(k)
                # generator by position, as diffusers; the same generator state draws the same noise
                want = theirs.step(out, t, x, torch.Generator().manual_seed(k))
                got = ours.step(out, t, x, torch.Generator().manual_seed(k))
                atol = step_atol(float(ours.alphas_cumprod[int(t)]), x, out, want.pred_original_sample)
                torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=atol)
                torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=0, atol=atol)


def test_seeded_steps_are_the_explicit_noise_steps_with_philox_noise():
    # the fused path (seed, default offset) = the explicit-noise path given that Philox noise,
    # which the tests above compare with diffusers
    x, eps, _ = _inputs(5)
    for ours, call in ((DDIMScheduler(eta=0.7), lambda s, **k: s.step(eps, 500, x, **k)),
                       (DDPMScheduler(), lambda s, **k: s.step(eps, 500, x, **k))):
        ours.set_timesteps(10) if isinstance(ours, DDIMScheduler) else ours.set_timesteps(timesteps=[500, 200])
        z = philox_normal(SHAPE, 9, 501 * x.numel())  # default_offset(500, numel, 1000)
        fused, explicit = call(ours, seed=9), call(ours, variance_noise=z)
        atol = step_atol(float(ours.alphas_cumprod[500]), x, eps)  # the kernel against torch ops: as above
        torch.testing.assert_close(fused.prev_sample, explicit.prev_sample, rtol=0, atol=atol)


@pytest.mark.parametrize("x0_shape,noise_shape,timesteps", [
    ((1, 2, 3, 4), (1, 2, 3, 4), [10, 500]),      # a batch of 1, 2 timesteps: 2 samples
    ((3, 2, 3, 4), (3, 2, 3, 4), [0, 321, 999]),  # one timestep per sample
    ((3, 2, 3, 4), (3, 2, 3, 4), [77]),           # one timestep for all
    ((2, 5), (1, 5), [3, 900]),                   # the noise broadcast too
])
def test_add_noise_broadcasts_as_diffusers(x0_shape, noise_shape, timesteps):
    x0, noise = torch.randn(x0_shape), torch.randn(noise_shape)
    t = torch.tensor(timesteps)
    for ours, theirs in ((DDPMScheduler(), diffusers.DDPMScheduler()), (DDIMScheduler(), diffusers.DDIMScheduler())):
        want = theirs.add_noise(x0, noise, t)
        got = ours.add_noise(x0, noise, t)
        assert got.shape == want.shape and got.dtype == want.dtype
        # sqrt(ab) x0 + sqrt(1 - ab) noise with coefficients below 1: the schedule drift (32 ulps,
        # test_schedules_agree) plus a few ulps of rounding, of values below 5 (randn of 48 values)
        torch.testing.assert_close(got, want, rtol=0, atol=2 * SCHEDULE_DRIFT_ULPS * ULP * 5)


# -- DPM-Solver++ --------------------------------------------------------------------------------

def _dpm_cases():
    yield dict()
    yield dict(timestep_spacing="leading", steps_offset=1)
    yield dict(timestep_spacing="trailing")
    yield dict(solver_type="heun")
    yield dict(final_sigmas_type="sigma_min")
    yield dict(final_sigmas_type="sigma_min", lower_order_final=False)
    yield dict(euler_at_final=True, final_sigmas_type="sigma_min")
    yield dict(solver_order=1)
    yield dict(prediction_type="sample")
    yield dict(prediction_type="v_prediction")
    yield dict(beta_schedule="squaredcos_cap_v2")


def _case_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("kw", list(_dpm_cases()), ids=_case_id)
def test_dpm_solver_matches_diffusers(kw):
    for n in (1, 2, 3, 5, 10, 20):
        ours, theirs = DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()
        # diffusers' float32 sigma = sqrt((1 - ab) / ab) from its float32 alpha_bar: the schedule
        # drift (and the rounding of 1 - ab) relative to 1 - ab = sigma^2 / (1 + sigma^2), halved
        # by the square root; twice the drift bound, relative to 1 - ab, covers it
        sigma = theirs.sigmas.double()
        bound = 2 * SCHEDULE_DRIFT_ULPS * ULP * sigma * (1 + sigma**2) / sigma.clamp(min=1e-30) ** 2
        assert bool(((ours.sigmas.double() - sigma).abs() <= bound).all())
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
        for k, t in enumerate(theirs.timesteps):
            out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
            want = theirs.step(out, t, x).prev_sample
            got = ours.step(out, t, x.clone())
            # each step from the same x (diffusers' result), so errors do not accumulate; the
            # previous x0 of each side went into the multistep correction with its own rounding
            atol = step_atol(float(ours.alphas_cumprod[int(t)]), x, out, want)
            torch.testing.assert_close(got.prev_sample, want, rtol=0, atol=atol)
            x = want
        assert theirs.step_index == ours.step_index == n


def test_dpm_solver_timesteps_for_every_step_count():
    for spacing in ("linspace", "leading", "trailing"):
        ours = DPMSolverMultistepScheduler(timestep_spacing=spacing)
        theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
        for n in range(1, 1000):
            theirs.set_timesteps(n)
            expected = theirs.timesteps.tolist()
            if len(set(expected)) != len(expected) or len(expected) != n or min(expected) < 0:
                with pytest.raises(ValueError):
                    ours.set_timesteps(n)
                continue
            assert ours.set_timesteps(n).timesteps.tolist() == expected


def test_schedulers_switch_with_from_config():
    # diffusers' idiom: a DPM-Solver++ from a DDPM scheduler's config
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    dpm = DPMSolverMultistepScheduler.from_config(ddpm.config)
    assert dpm.config.prediction_type == "v_prediction" and torch.equal(dpm.betas, ddpm.betas)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(diffusers.DDPMScheduler(prediction_type="v_prediction")
                                                                .config)
    dpm.set_timesteps(10)
    theirs.set_timesteps(10)
    assert dpm.timesteps.tolist() == theirs.timesteps.tolist()


def test_step_output_like_diffusers_output():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x, eps, _ = _inputs(1)
    got, want = ours.step(eps, 799, x), theirs.step(eps, 799, x)
    assert isinstance(got, StepOutput) and list(got.keys()) == list(want.keys())
    for key in want.keys():
        assert torch.equal(got[key], getattr(got, key))
    assert got[0] is got.prev_sample and got[1] is got.pred_original_sample
    plain = ours.step(eps, 799, x, return_dict=False)
    assert type(plain) is tuple and len(plain) == len(theirs.step(eps, 799, x, return_dict=False)) == 2
    assert len(DPMSolverMultistepScheduler().set_timesteps(3).step(eps, 999 - 333, x, return_dict=False)) == 1


def test_scheduler_built_from_a_noise_schedule_matches_diffusers_given_its_betas():
    schedule = NoiseSchedule.linear()
    ours = DDIMScheduler(schedule, timestep_spacing="leading", set_alpha_to_one=True, use_clipped_model_output=False)
    theirs = diffusers.DDIMScheduler(trained_betas=schedule.betas.numpy())
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x, eps, _ = _inputs(2)
    for t in theirs.timesteps:
        want = theirs.step(eps, t, x).prev_sample
        atol = step_atol(float(schedule.alphas_cumprod[int(t)]), x, eps)  # module docstring
        torch.testing.assert_close(ours.step(eps, t, x).prev_sample, want, rtol=0, atol=atol)
