import math

import numpy as np
import pytest
import torch

from patchddm_fast.diffusion import DDPMScheduler, NoiseSchedule


def test_linear_schedule_closed_form():
    s = NoiseSchedule.linear()
    assert s.num_timesteps == 1000 and s.betas.dtype == torch.float64
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    # float64 linspace by two routes: at most 1 ulp of 0.02 (3.5e-18).
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=0, atol=1e-17)
    alphas_cumprod = np.cumprod(1 - betas)
    # A 1000-term float64 product: at most 1000 roundings of 1.1e-16 each, 1.1e-13 in the worst
    # case, about 1e-15 in practice (random-walk rounding); the definitions below are short
    # float64 formulas of these, a few ulps further.
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-14)
    prev = np.append(1.0, alphas_cumprod[:-1])
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), prev, rtol=1e-14)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - alphas_cumprod), rtol=1e-13)
    np.testing.assert_allclose(s.posterior_variance.numpy(), betas * (1 - prev) / (1 - alphas_cumprod), rtol=1e-13)
    np.testing.assert_allclose(s.posterior_mean_coef1.numpy(), betas * np.sqrt(prev) / (1 - alphas_cumprod), rtol=1e-13)
    np.testing.assert_allclose(s.posterior_mean_coef2.numpy(),
                               (1 - prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod), rtol=1e-13)
    assert s.posterior_variance[0] == 0  # q(x_{-1} | x_0, x0) is exact


def test_posterior_mean_is_the_bayes_combination():
    # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): its precision and mean in closed form
    s = NoiseSchedule.linear()
    for t in (1, 10, 500, 999):
        beta, ab_prev = float(s.betas[t]), float(s.alphas_cumprod_prev[t])
        precision = (1 - beta) / beta + 1 / (1 - ab_prev)
        assert math.isclose(1 / precision, float(s.posterior_variance[t]), rel_tol=1e-12)
        coef_xt = math.sqrt(1 - beta) / beta / precision
        coef_x0 = math.sqrt(ab_prev) / (1 - ab_prev) / precision
        assert math.isclose(coef_xt, float(s.posterior_mean_coef2[t]), rel_tol=1e-12)
        assert math.isclose(coef_x0, float(s.posterior_mean_coef1[t]), rel_tol=1e-12)


def test_cosine_schedule_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 900):
        assert math.isclose(float(s.alphas_cumprod[t]), f(t + 1) / f(0), rel_tol=1e-10)
    assert float(s.betas.max()) <= 0.999 and float(s.betas[-1]) == pytest.approx(0.999)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_from_name_and_alpha_bar_lookup():
    s = NoiseSchedule.from_name("linear", 50)
    # guided-diffusion's named schedule: both ends scaled by 1000 / 50 = 20 (test below)
    assert len(s) == 50 and float(s.betas[-1]) == pytest.approx(0.4)
    assert NoiseSchedule.from_name("cosine").name == "cosine"
    assert s.alpha_bar([0, 49]).tolist() == [float(s.alphas_cumprod[0]), float(s.alphas_cumprod[49])]
    with pytest.raises(ValueError, match="timesteps must lie in"):
        s.alpha_bar(50)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        NoiseSchedule.from_name("quadratic")


@pytest.mark.parametrize("T", [21, 50, 100, 250, 1000, 4000])
def test_named_linear_scales_by_1000_over_T_and_explicit_ends_do_not(T):
    # guided-diffusion's get_named_beta_schedule("linear", T), restated: scale = 1000 / T,
    # np.linspace(scale * 1e-4, scale * 0.02, T) in float64
    scale = 1000 / T
    expected = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    # float64 linspace by torch and by numpy: at most 1 ulp of the largest beta (< 1).
    np.testing.assert_allclose(NoiseSchedule.from_name("linear", T).betas.numpy(), expected, rtol=0, atol=2.3e-16)
    # explicit ends are taken as given, as diffusers' beta_start / beta_end (never scaled)
    explicit = NoiseSchedule.linear(T, 1e-4, 0.02).betas
    assert float(explicit[0]) == 1e-4 and float(explicit[-1]) == pytest.approx(0.02, rel=1e-15)
    if T == 1000:  # PatchDDM's schedule: the two agree
        assert torch.equal(NoiseSchedule.from_name("linear").betas, NoiseSchedule.linear().betas)


def test_a_recorded_linear_schedule_without_betas_is_the_named_one():
    # to_dict records the betas' ends: taken as given; a record with only the step count is
    # guided-diffusion's named schedule, scaled as from_name
    assert torch.equal(NoiseSchedule.from_dict({"name": "linear", "num_timesteps": 50}).betas,
                       NoiseSchedule.from_name("linear", 50).betas)
    explicit = NoiseSchedule.linear(50)
    assert torch.equal(NoiseSchedule.from_dict(explicit.to_dict()).betas, explicit.betas)
    assert torch.equal(NoiseSchedule.from_dict({"name": "linear"}).betas, NoiseSchedule.linear().betas)
    # a schedule recorded by its betas (e.g. a scheduler's, built as diffusers builds it)
    built = DDPMScheduler(num_train_timesteps=50).schedule
    assert torch.equal(NoiseSchedule.from_dict(built.to_dict()).betas, built.betas)


def test_named_linear_refuses_betas_of_one_or_more():
    with pytest.raises(ValueError, match=r"num_timesteps > 20"):
        NoiseSchedule.from_name("linear", 20)


@pytest.mark.parametrize("betas,match", [([], "non-empty"), ([0.1, 1.0], r"\(0, 1\)"), ([0.1, float("nan")], "NaN"),
                                         ([[0.1]], "1-D")])
def test_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(betas)


def test_bad_step_count():
    with pytest.raises(ValueError, match="positive int"):
        NoiseSchedule.linear(0)
