import math

import pytest
import torch

from patchddm_fast.diffusion import DDIMScheduler, DDPMScheduler, NoiseSchedule, StepOutput, inference_timesteps
from patchddm_fast.diffusion.schedulers import default_offset
from patchddm_fast.ops import philox_normal, q_sample

SCHEDULE = NoiseSchedule.linear()
AB = SCHEDULE.alphas_cumprod
SHAPE = (2, 1, 3, 4, 5)
# The ops apply their coefficients in float32 (float64 data included): compare at 1e-6.


def _inputs(scale=1.0):
    x = torch.randn(SHAPE, dtype=torch.float64) * scale
    eps = torch.randn(SHAPE, dtype=torch.float64)
    return x, eps


def _ddim_closed_form(x, eps, ab_t, ab_prev, eta, clip, z):
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z, x0


@pytest.mark.parametrize("steps", [1, 3, 20, 1000])
def test_set_timesteps_patchddm(steps):
    # the PatchDDM form (a NoiseSchedule first) keeps the original spacing by default
    s = DDIMScheduler(SCHEDULE).set_timesteps(steps)
    assert s.timestep_spacing == "patchddm"
    assert DDIMScheduler(timestep_spacing="patchddm").set_timesteps(steps).timesteps.tolist() == s.timesteps.tolist()
    # round(999 * (1 - k / (steps - 1))), ties to even (there are ties only for 3 steps: 499.5 -> 500)
    expected = [999] if steps == 1 else [round(999 * (1 - k / (steps - 1))) for k in range(steps)]
    assert s.timesteps.tolist() == expected
    assert s.timesteps.dtype == torch.int64 and s.num_inference_steps == steps
    if steps == 3:
        assert expected == [999, 500, 0]
    if steps == 1000:
        assert expected == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 20, 1000])
def test_other_spacings(spacing, steps):
    t = inference_timesteps(1000, steps, spacing).tolist()
    assert len(t) == steps and len(set(t)) == steps and t == sorted(t, reverse=True)
    assert 0 <= t[-1] and t[0] <= 999
    if spacing == "leading":
        assert t[-1] == 0 and t[0] == (steps - 1) * (1000 // steps)
    else:
        assert t[0] == 999


def test_set_timesteps_rejects_bad_counts():
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            DDIMScheduler().set_timesteps(bad)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="uniform")


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_eta0_closed_form(clip, set_alpha_to_one):
    s = DDIMScheduler(SCHEDULE, eta=0.0, clip_sample=clip, set_alpha_to_one=set_alpha_to_one).set_timesteps(4)
    times = s.timesteps.tolist()
    assert times == [999, 666, 333, 0]
    for t, prev in zip(times, times[1:] + [None]):
        x, eps = _inputs(scale=1.5)
        ab_prev = float(AB[prev]) if prev is not None else (1.0 if set_alpha_to_one else float(AB[0]))
        out = s.step(eps, t, x)
        expected, x0 = _ddim_closed_form(x, eps, float(AB[t]), ab_prev, 0.0, clip, 0.0)
        # x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) cancels terms of size |x| / sqrt(ab)
        atol = 1e-6 * float(x.abs().max() + eps.abs().max()) / math.sqrt(float(AB[t]))
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=atol)
        torch.testing.assert_close(out.pred_x0, x0, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_eta_positive_closed_form(eta):
    s = DDIMScheduler(SCHEDULE, eta=eta, clip_sample=True).set_timesteps(20)
    t = int(s.timesteps[5])
    prev = int(s.timesteps[6])
    x, eps = _inputs()
    out = s.step(eps, t, x, seed=123, offset=77)
    z = philox_normal(SHAPE, 123, 77, dtype=torch.float64)
    expected, _ = _ddim_closed_form(x, eps, float(AB[t]), float(AB[prev]), eta, True, z)
    # float32 kernel against the float64 closed form with the same Philox draw: a few float32
    # ulps of values below 4 (at t mid-schedule 1/sqrt(ab) is below 3).
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=1e-6)
    # same seed and offset: same noise; another offset: other noise
    assert torch.equal(s.step(eps, t, x, seed=123, offset=77).prev_sample, out.prev_sample)
    assert not torch.allclose(s.step(eps, t, x, seed=123, offset=78).prev_sample, out.prev_sample)
    # eta = 1 over one training step is the DDPM posterior with fixed_small variance
    if eta == 1.0:
        ddpm = DDPMScheduler(SCHEDULE, clip_sample=True).set_timesteps(20)
        torch.testing.assert_close(ddpm.step(eps, t, x, seed=123, offset=77).prev_sample, out.prev_sample)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_closed_form(variance):
    s = DDPMScheduler(SCHEDULE, variance_type=variance, clip_sample=False)  # all 1000 steps by default
    assert s.num_inference_steps == 1000
    for t in (999, 500, 1):
        x, eps = _inputs()
        out = s.step(eps, t, x, seed=5, offset=0)
        x0 = (x - SCHEDULE.sqrt_one_minus_alphas_cumprod[t] * eps) / SCHEDULE.sqrt_alphas_cumprod[t]
        mean = SCHEDULE.posterior_mean_coef1[t] * x0 + SCHEDULE.posterior_mean_coef2[t] * x
        var = SCHEDULE.posterior_variance[t] if variance == "fixed_small" else SCHEDULE.betas[t]
        expected = mean + var.sqrt() * philox_normal(SHAPE, 5, 0, dtype=torch.float64)
        # float32 against float64 posterior coefficients: at t = 999, x0 is magnified by 156 but the
        # mean's coefficient on x0 is below 0.01, so a few float32 ulps of the result remain.
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.pred_x0, x0, rtol=1e-6, atol=1e-6)
    # the last step returns the predicted x0 (clipped), without noise
    x, eps = _inputs(scale=3)
    clipping = DDPMScheduler(SCHEDULE, clip_sample=True)
    out = clipping.step(eps, 0, x, seed=5)
    x0 = ((x - SCHEDULE.sqrt_one_minus_alphas_cumprod[0] * eps) / SCHEDULE.sqrt_alphas_cumprod[0]).clamp(-1, 1)
    # At t = 0, x0 = (x - 0.01 eps) / 0.99995: a few float32 ulps, then clipped.
    torch.testing.assert_close(out.prev_sample, x0, rtol=1e-6, atol=1e-6)


def test_ddpm_respaced_step_uses_the_jump_beta():
    s = DDPMScheduler(SCHEDULE, clip_sample=False).set_timesteps(3)  # 999 -> 500 -> 0
    x, eps = _inputs()
    ab_t, ab_prev = float(AB[500]), float(AB[0])
    beta = 1 - ab_t / ab_prev
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    mean = beta * math.sqrt(ab_prev) / (1 - ab_t) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab_t) * x
    sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab_t))
    # no offset given: the default one of timestep 500 (block 501 of numel elements)
    offset = default_offset(500, math.prod(SHAPE), 1000)
    assert offset == 501 * math.prod(SHAPE)
    expected = mean + sigma * philox_normal(SHAPE, 9, offset, dtype=torch.float64)
    # float32 kernel against float64 formula at t = 500 (1/sqrt(ab) = 3.6): a few float32 ulps.
    torch.testing.assert_close(s.step(eps, 500, x, seed=9).prev_sample, expected, rtol=1e-6, atol=1e-6)


def test_step_output_and_writing_into_a_buffer_channel():
    s = DDIMScheduler().set_timesteps(5)
    buffer = torch.randn(2, 8, 4, 4, 4)
    before = buffer.clone()
    eps = torch.randn(2, 1, 4, 4, 4)
    expected = s.step(eps, 749, buffer[:, 7:8].clone())
    result = s.step(eps, 749, buffer[:, 7:8], out=buffer[:, 7:8])
    assert isinstance(result, StepOutput)
    prev, x0 = result  # unpacks like MONAI's tuple
    assert prev.data_ptr() == buffer[:, 7:8].data_ptr() and x0 is result.pred_original_sample
    torch.testing.assert_close(buffer[:, 7:8], expected.prev_sample)
    assert torch.equal(buffer[:, :7], before[:, :7])  # the condition channels are untouched


def test_model_output_in_another_dtype_is_cast():
    s = DDIMScheduler().set_timesteps(5)
    x = torch.randn(1, 1, 4, 4, 4)
    eps = torch.randn(1, 1, 4, 4, 4)
    out = s.step(eps.bfloat16(), 999, x).prev_sample
    assert out.dtype == torch.float32
    # The same float32 computation after the same cast: default float32 tolerances (1.3e-6).
    torch.testing.assert_close(out, s.step(eps.bfloat16().float(), 999, x).prev_sample)


def test_add_noise_matches_q_sample():
    s = DDPMScheduler(SCHEDULE)
    x0 = torch.randn(3, 1, 4, 5, 6)
    t = torch.tensor([0, 321, 999])
    noise = philox_normal(x0.shape, 42, 0)
    explicit = s.add_noise(x0, noise, t)
    fused = s.add_noise(x0, None, t, seed=42)
    reference, _ = q_sample(x0, AB[t], seed=42)
    # Noise given as a tensor or drawn in the kernel: the same float32 values, the same formula
    # up to fused multiply-add contraction (1 ulp).
    torch.testing.assert_close(explicit, fused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    closed = AB[t].sqrt().view(-1, 1, 1, 1, 1) * x0.double() + (1 - AB[t]).sqrt().view(-1, 1, 1, 1, 1) * noise.double()
    torch.testing.assert_close(explicit.double(), closed, rtol=1e-6, atol=1e-6)


def test_bad_step_arguments():
    s = DDIMScheduler().set_timesteps(5)
    x = torch.randn(1, 1, 4, 4, 4)
    for bad in (1000, -1):
        with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\)"):
            s.step(x, bad, x)
    with pytest.raises(ValueError, match="timestep must be one integer"):
        s.step(x, torch.tensor([1, 2]), x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 4, 4, 4\)"):
        s.step(torch.randn(1, 2, 4, 4, 4), 999, x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMScheduler(eta=-0.1)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="do not broadcast"):
        s.add_noise(x, torch.randn(2, 1, 4, 4, 5), 3)


def test_cosine_schedule_drives_the_scheduler():
    # diffusers' name of the cosine schedule, and ours; given by keyword, its betas are rounded
    # to float32 as diffusers rounds them
    for name in ("squaredcos_cap_v2", "cosine"):
        assert torch.equal(DDIMScheduler(beta_schedule=name).betas, NoiseSchedule.cosine().betas.float().double())
    s = DDIMScheduler(NoiseSchedule.cosine()).set_timesteps(3)
    x, eps = _inputs()
    cos = NoiseSchedule.cosine().alphas_cumprod
    expected, _ = _ddim_closed_form(x, eps, float(cos[500]), float(cos[0]), 0.0, True, 0.0)
    # float32 kernel against float64 closed form at t = 500: a few float32 ulps.
    torch.testing.assert_close(s.step(eps, 500, x).prev_sample, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("t", [999, 500, 20])
def test_x0_and_v_predictions_step_as_the_noise_they_imply(scheduler, prediction_type, t):
    # A network that predicts x0 or v, stepped by a scheduler told so, must land where an
    # epsilon network predicting the implied noise lands.
    make = {"ddim": lambda **k: DDIMScheduler(eta=0.5, **k), "ddpm": lambda **k: DDPMScheduler(**k)}[scheduler]
    ours, plain = make(prediction_type=prediction_type), make()
    x = torch.randn(SHAPE, dtype=torch.float64)
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 1.6 - 0.8  # inside the clip range
    eps = torch.randn(SHAPE, dtype=torch.float64)
    a, s = math.sqrt(float(AB[t])), math.sqrt(1 - float(AB[t]))
    x = a * x0 + s * eps  # a consistent x_t, so all three predictions describe the same state
    output = x0 if prediction_type == "sample" else a * eps - s * x0
    got = ours.step(output, t, x, seed=4, offset=9)
    want = plain.step(eps, t, x, seed=4, offset=9)
    # The kernel recomputes x0 from the implied noise in float32: rounding of x_t (values
    # below 4) magnified by 1 / sqrt(ab_t), 156 at t = 999; 32 ulps of that bound it.
    atol = 32 * 2.0 ** -24 * 4 / a
    torch.testing.assert_close(got.pred_x0, want.pred_x0, rtol=0, atol=atol)
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=atol)
    torch.testing.assert_close(got.pred_x0, x0, rtol=0, atol=atol)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMScheduler(prediction_type="x0")
