import math

import numpy as np
import pytest
import torch

from diffusion_models import LocalConvModel, OracleModel
from patchddm_fast.diffusion import (DDIMScheduler, NoiseSchedule, ddim_sample, ddpm_sample,
                                     original_ddim_sample, sample_loop)

AB = NoiseSchedule.linear().alphas_cumprod


def _condition_noise(batch=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, size, size, size, generator=g), torch.randn(batch, 1, size, size, size, generator=g)


def _original_loop_in_numpy(model, condition, noise, steps):
    """The original DDIM, written from the golden README, in float64 numpy."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = np.cumprod(1 - betas)
    times = np.round(np.linspace(999, 0, steps)).astype(int)
    x = noise.double().numpy()
    for k, t in enumerate(times):
        inp = torch.cat([condition, torch.from_numpy(x).float()], dim=1)
        with torch.no_grad():
            eps = model(inp, torch.full((x.shape[0],), int(t))).double().numpy()
        ab = alpha_bar[t]
        ab_prev = alpha_bar[times[k + 1]] if k + 1 < len(times) else alpha_bar[0]
        x0 = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps
    return torch.from_numpy(x).float()


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_original_ddim_matches_the_readme_loop(steps):
    condition, noise = _condition_noise(batch=2)
    model = LocalConvModel().eval()
    ours = original_ddim_sample(model, condition, noise, steps)
    reference = _original_loop_in_numpy(model, condition, noise, steps)
    assert ours.shape == noise.shape
    # The same float32 model outputs; the update in float32 (ours) against float64 (numpy): the
    # first x0 magnifies float32 rounding (6e-8) of values up to 4 by 156, about 4e-5 before the
    # clip, which the next alpha_bar factor (<= 0.1 here) shrinks below 1e-5.
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    ours_calls = [c[1][0] for c in model.calls[:steps]]  # then come the calls of the numpy loop
    assert ours_calls == np.round(np.linspace(999, 0, steps)).astype(int).tolist()


def test_original_ddim_with_a_perfect_denoiser_lands_on_its_closed_form():
    # the oracle's x0 is the target at every step, so the noise is preserved:
    # the last step (to alpha_bar[0]) gives sqrt(ab0) * target + sqrt(1 - ab0) * x_T
    # (to float32 rounding, magnified by 1 / sqrt(alpha_bar_999) = 158 in the first x0)
    condition, noise = _condition_noise()
    target = OracleModel.target(condition)
    sample = original_ddim_sample(OracleModel(), condition, noise, 5)
    ab0 = float(AB[0])
    torch.testing.assert_close(sample, math.sqrt(ab0) * target + math.sqrt(1 - ab0) * noise, rtol=0, atol=2e-4)


def test_one_buffer_serves_every_step():
    condition, noise = _condition_noise()
    model = LocalConvModel()
    original_ddim_sample(model, condition, noise, 6)
    assert len(model.calls) == 6 and len({c[0] for c in model.calls}) == 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta"])
def test_stochastic_samplers_are_reproducible_by_seed(sampler):
    condition, noise = _condition_noise()
    model = LocalConvModel().eval()
    run = (lambda seed: ddpm_sample(model, condition, noise, 10, seed=seed)) if sampler == "ddpm" else \
        (lambda seed: ddim_sample(model, condition, noise, 10, eta=0.8, seed=seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddpm_with_a_perfect_denoiser_returns_the_target():
    condition, noise = _condition_noise()
    sample = ddpm_sample(OracleModel(), condition, noise, 20, seed=3)
    # The last DDPM step returns the oracle's x0 itself; float32 rounding of the posterior mean
    # with coefficients near 1 leaves a few ulps.
    torch.testing.assert_close(sample, OracleModel.target(condition), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_the_model_in_bf16():
    condition, noise = _condition_noise()
    model = LocalConvModel().eval()
    scheduler = DDIMScheduler().set_timesteps(3)
    low = sample_loop(model, scheduler, condition, noise, precision="bfloat16")
    assert all(model.autocast_seen) and low.dtype == torch.float32
    full = sample_loop(model, scheduler, condition, noise)
    assert float((low - full).abs().mean()) < 0.01 and float((low - full).abs().max()) < 0.5


def test_bad_inputs():
    condition, noise = _condition_noise()
    model = LocalConvModel()
    with pytest.raises(ValueError, match="noise has shape"):
        original_ddim_sample(model, condition, noise[:, :, :4], 3)
    with pytest.raises(ValueError, match="condition must be a floating-point"):
        original_ddim_sample(model, condition[0], noise, 3)
    with pytest.raises(ValueError, match=r"the model returned \(1, 8, 8, 8, 8\)"):
        original_ddim_sample(lambda x, t: x, condition, noise, 3)
    with pytest.raises(ValueError, match="precision"):
        sample_loop(model, DDIMScheduler(), condition, noise, precision="int8")
