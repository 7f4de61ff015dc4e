"""The schedulers' interface (issue 15): diffusers' construction, attributes, step and output;
the PatchDDM form's call forms kept working; noise that never repeats by accident;
DPM-Solver++ on the sampling loop and against an oracle; the README example."""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from diffusion_models import LocalConvModel, OracleModel
from patchddm_fast.diffusion import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FullVolumeSampler,
                                     NoiseSchedule, PlanOptions, StepOutput, default_offset, make_scheduler,
                                     sample_loop)
from patchddm_fast.nn import load_original_checkpoint
from patchddm_fast.ops import philox_normal
from test_golden_ddim import SAMPLE_RTOL

SCHEDULE = NoiseSchedule.linear()
SHAPE = (2, 1, 8, 8, 8)


def _x_eps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


# -- construction and attributes -----------------------------------------------------------------

def test_constructed_from_diffusers_keywords_with_their_defaults():
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True, steps_offset=1,
                      timestep_spacing="leading")
    assert s.config.num_train_timesteps == s.config["num_train_timesteps"] == 1000
    assert s.config.timestep_spacing == "leading" and s.config.steps_offset == 1
    assert s.init_noise_sigma == 1.0 and s.order == 1
    assert s.betas.shape == s.alphas_cumprod.shape == (1000,) and float(s.final_alpha_cumprod) == 1.0
    with pytest.raises(TypeError, match="read-only"):
        s.config["eta"] = 1.0
    # num_train_timesteps by position, as diffusers' first parameter
    for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler):
        by_position = cls(500)
        assert by_position.config.num_train_timesteps == by_position.num_train_timesteps == 500
        assert "num_train_timesteps" not in by_position.config["_use_default_values"]
    d = DDIMScheduler()  # diffusers' defaults
    assert (d.config.timestep_spacing, d.config.set_alpha_to_one, d.config.clip_sample) == ("leading", True, True)
    assert d.config.use_clipped_model_output is False
    assert DDPMScheduler().config.variance_type == "fixed_small"
    assert DPMSolverMultistepScheduler().config.timestep_spacing == "linspace"


def test_patchddm_form_keeps_the_original_sampler_settings():
    s = DDIMScheduler(SCHEDULE, eta=0.0)
    assert (s.timestep_spacing, s.set_alpha_to_one, s.config.use_clipped_model_output) == ("patchddm", False, True)
    assert float(s.final_alpha_cumprod) == float(SCHEDULE.alphas_cumprod[0]) and s.schedule is SCHEDULE
    assert DDPMScheduler(SCHEDULE).timestep_spacing == "patchddm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers' linspace, DPM-Solver's default: no warning
        assert DPMSolverMultistepScheduler(SCHEDULE).timestep_spacing == "linspace"
    # the original-exact sampler's call (sampling.original_ddim_sample) gives the original list
    original = DDIMScheduler(NoiseSchedule.linear(), eta=0.0, clip_sample=True, set_alpha_to_one=False,
                             timestep_spacing="patchddm").set_timesteps(5)
    assert original.timesteps.tolist() == [999, 749, 500, 250, 0]  # round(linspace(999, 0, 5)), 499.5 -> 500
    assert [original.previous_timestep(t) for t in original.timesteps] == [749, 500, 250, 0, -1]


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"first argument must be a NoiseSchedule \(the PatchDDM form\) or num_train_timesteps"):
        DDIMScheduler("linear")
    with pytest.raises(TypeError, match="num_train_timesteps given twice"):
        DDIMScheduler(1000, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="give either a NoiseSchedule or num_train_timesteps"):
        DDIMScheduler(SCHEDULE, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDPMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        DDIMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="steps_offset must be an int >= 0"):
        DDIMScheduler(steps_offset=-1)
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sigma'"):
        DPMSolverMultistepScheduler(sigma=1)
    s = DDIMScheduler().set_timesteps(5)
    x, eps = _x_eps()
    with pytest.raises(ValueError, match="give one of variance_noise, generator and seed, not more"):
        s.step(eps, 799, x, 0.5, generator=torch.Generator(), variance_noise=eps)
    with pytest.raises(ValueError, match="give one of variance_noise, generator and seed, not more"):
        DDPMScheduler().step(eps, 999, x, torch.Generator(), seed=1)
    with pytest.raises(ValueError, match="variance_noise has shape"):
        s.step(eps, 799, x, 0.5, variance_noise=eps[:1])
    with pytest.raises(ValueError, match="member must be an int >= 0"):
        s.step(eps, 799, x, 0.5, member=-1)


def test_config_round_trips_and_schedulers_copy():
    for s in (DDIMScheduler(SCHEDULE, eta=0.3), DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False),
              DDPMScheduler(variance_type="fixed_large"), DPMSolverMultistepScheduler(solver_type="heun")):
        again = type(s).from_config(s.config)
        assert dict(again.config) == dict(s.config) and torch.equal(again.alphas_cumprod, s.alphas_cumprod)
        clone = pickle.loads(pickle.dumps(copy.deepcopy(s)))
        assert dict(clone.config) == dict(s.config)
    # the PatchDDM form's settings travel with its config (they are not diffusers' defaults)
    assert DDIMScheduler.from_config(DDIMScheduler(SCHEDULE).config).timestep_spacing == "patchddm"


# -- step and its output -------------------------------------------------------------------------

def test_step_output_by_attribute_key_index_and_unpacking():
    s = DDIMScheduler().set_timesteps(5)
    x, eps = _x_eps()
    out = s.step(eps, 799, x)
    assert isinstance(out, StepOutput) and len(out) == 2
    assert out.prev_sample is out["prev_sample"] is out[0]
    assert out.pred_original_sample is out["pred_original_sample"] is out[1] is out.pred_x0
    prev, x0 = out
    assert prev is out.prev_sample and x0 is out.pred_original_sample
    assert dict(out.items()).keys() == {"prev_sample", "pred_original_sample"} and out.to_tuple() == tuple(out)
    with pytest.raises(KeyError):
        out["sample"]


def test_eta_and_generator_by_position_as_diffusers():
    s = DDIMScheduler().set_timesteps(10)
    x, eps = _x_eps()
    by_position = s.step(eps, 900, x, 0.5, False, torch.Generator().manual_seed(1))
    by_keyword = s.step(eps, 900, x, eta=0.5, use_clipped_model_output=False,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(by_position.prev_sample, by_keyword.prev_sample)
    assert not torch.equal(by_position.prev_sample, s.step(eps, 900, x).prev_sample)  # eta 0.5 moved it
    d = DDPMScheduler().set_timesteps(10)
    a = d.step(eps, 900, x, torch.Generator().manual_seed(2))
    assert torch.equal(a.prev_sample, d.step(eps, 900, x, generator=torch.Generator().manual_seed(2)).prev_sample)


def test_patchddm_call_forms_keep_working():
    # as full_volume.py, sampling.py, train/validation.py and inference.py call it
    s = DDIMScheduler(SCHEDULE, eta=0.0).set_timesteps(4)
    assert s.timesteps.tolist() == [999, 666, 333, 0]
    buffer = torch.randn(1, 8, 4, 4, 4)
    eps = torch.randn(1, 1, 4, 4, 4)
    x0 = torch.empty(1, 1, 4, 4, 4)
    expected = s.step(eps, 666, buffer[:, 7:8].clone())
    result = s.step(eps, 666, buffer[:, 7:8], seed=3, offset=4 * 64, out=buffer[:, 7:8], x0_out=x0)
    prev, pred = result
    assert prev.data_ptr() == buffer[:, 7:8].data_ptr() and pred is x0 is result.pred_x0
    torch.testing.assert_close(prev, expected.prev_sample, rtol=0, atol=0)  # the same deterministic step


def test_a_timestep_between_listed_ones_steps_to_the_next_listed():
    s = DDIMScheduler(SCHEDULE).set_timesteps(5)  # 999, 749, 500, 250, 0
    assert s.previous_timestep(998) == 749 and s.previous_timestep(0) == -1
    d = DDIMScheduler(timestep_spacing="trailing").set_timesteps(3)  # diffusers: t - T // n
    assert d.timesteps.tolist() == [999, 666, 332] and d.previous_timestep(666) == 333


def test_custom_timesteps():
    s = DDPMScheduler().set_timesteps(timesteps=[900, 400, 10])
    assert s.timesteps.tolist() == [900, 400, 10] and s.custom_timesteps
    assert [s.previous_timestep(t) for t in (900, 400, 10)] == [400, 10, -1]
    with pytest.raises(ValueError, match="strictly descending"):
        s.set_timesteps(timesteps=[10, 400])
    with pytest.raises(ValueError, match="not both"):
        s.set_timesteps(3, timesteps=[2, 1])


def test_clip_sample_range_and_use_clipped_model_output():
    x, eps = _x_eps(4)
    x = x * 3
    t = 20
    ab = float(DDIMScheduler().alphas_cumprod[t])
    for rederive in (False, True):
        s = DDIMScheduler(clip_sample_range=0.5, timestep_spacing="patchddm").set_timesteps(50)
        out = s.step(eps, t, x, 0.0, rederive)
        x0 = ((x.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)).clamp(-0.5, 0.5)
        e = (x.double() - math.sqrt(ab) * x0) / math.sqrt(1 - ab) if rederive else eps.double()
        ab_prev = float(s.alphas_cumprod[s.previous_timestep(t)])
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * e
        # float32 against float64 at t = 20 (1 / sqrt(ab) = 1.02, 1 / sqrt(1 - ab) = 16 in the
        # re-derived noise): 64 ulps of the operands (below 16)
        torch.testing.assert_close(out.prev_sample.double(), want, rtol=0, atol=64 * 2.0**-24 * 16)
        assert float(out.pred_original_sample.abs().max()) <= 0.5


def test_patchddm_spacing_given_by_keyword_reproduces_the_golden_sample(golden_dir):
    # The original sampler in diffusers' terms (its own spacing, the last step to alpha_bar[0],
    # the noise re-derived from the clipped x0); the betas are diffusers' float32 ones here
    # (1e-9 relative from the original's float64), far inside the golden tolerance.
    data = np.load(f"{golden_dir}/reference_unet_small.npz")
    model = load_original_checkpoint(f"{golden_dir}/reference_unet_small.npz")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=False, timestep_spacing="patchddm", use_clipped_model_output=True)
    scheduler.set_timesteps(int(data["ddim_sampling_steps"]))
    sample = sample_loop(model, scheduler, torch.from_numpy(data["ddim_condition"]),
                         torch.from_numpy(data["ddim_initial_noise"]))
    expected = torch.from_numpy(data["ddim_sample"])
    # the golden tolerance and its reasons: test_golden_ddim.py's module docstring
    assert float((sample - expected).abs().max() / expected.abs().max()) < SAMPLE_RTOL


# -- noise that never repeats by accident (issue 15, item 2) --------------------------------------

def _drawn_noise(s, t, x, eps, **kw):
    """The noise a step drew: (seeded step - the same step with zero noise) / sigma."""
    noisy = s.step(eps, t, x, **kw).prev_sample.double()
    mean = s.step(eps, t, x, variance_noise=torch.zeros_like(x)).prev_sample.double()
    return (noisy - mean).flatten()


def _correlation(a, b):
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_one_seed_draws_fresh_noise_at_every_step_and_member(kind):
    s = (DDPMScheduler(clip_sample=False) if kind == "ddpm" else DDIMScheduler(eta=1.0, clip_sample=False))
    s.set_timesteps(1000)
    x, eps = _x_eps(5)
    z999 = _drawn_noise(s, 999, x, eps, seed=3)
    z998 = _drawn_noise(s, 998, x, eps, seed=3)
    z999_member1 = _drawn_noise(s, 999, x, eps, seed=3, member=1)
    # 1024 independent normals: a correlation of 0.2 is 6 standard deviations (1 / 32) away
    assert abs(_correlation(z999, z998)) < 0.2 and abs(_correlation(z999, z999_member1)) < 0.2
    # the same seed reproduces the step exactly, and it is the Philox noise at the default offset
    assert torch.equal(s.step(eps, 999, x, seed=3).prev_sample, s.step(eps, 999, x, seed=3).prev_sample)
    z = philox_normal(SHAPE, 3, default_offset(999, x.numel(), 1000))
    explicit = s.step(eps, 999, x, variance_noise=z).prev_sample
    # fused kernel against the same formula in torch ops: float32 rounding of values below 8
    torch.testing.assert_close(s.step(eps, 999, x, seed=3).prev_sample, explicit, rtol=0, atol=8 * 2.0**-24 * 8)


def test_default_offsets_never_overlap():
    n, T = 1000, 1000
    blocks = sorted(default_offset(t, n, T, m) for t in range(T) for m in range(3))
    assert blocks[0] == n  # offset 0 .. n-1 stays free for x_T
    assert all(b - a >= n for a, b in zip(blocks, blocks[1:]))


def test_a_seeded_ddpm_run_is_reproduced_by_its_seed():
    condition = torch.randn(1, 7, 8, 8, 8)
    noise = torch.randn(1, 1, 8, 8, 8)
    model = LocalConvModel().eval()

    def run(seed):
        s = DDPMScheduler(clip_sample=True).set_timesteps(8)
        x = noise.clone()
        for t in s.timesteps:
            eps = model(torch.cat([condition, x], 1), t.expand(1))
            x = s.step(eps, t, x, seed=seed).prev_sample
        return x

    a = run(5)
    assert torch.equal(a, run(5)) and not torch.equal(a, run(6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_noise_is_the_same_on_cpu_and_gpu():
    s = DDIMScheduler(eta=1.0).set_timesteps(10)
    x, eps = _x_eps(6)
    cpu = s.step(eps, 900, x, seed=11).prev_sample
    gpu = s.step(eps.cuda(), 900, x.cuda(), seed=11).prev_sample.cpu()
    # the same Philox values; the devices' float32 log/cos/sin differ in the last bits, and
    # the step's arithmetic by fused multiply-adds: a few ulps of values below 8
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=16 * 2.0**-24 * 8)


# -- DPM-Solver++ --------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 3, 5, 10])
def test_dpm_solver_with_an_oracle_lands_on_the_target(prediction_type, steps):
    target = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    s = DPMSolverMultistepScheduler(prediction_type=prediction_type).set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in s.timesteps:
        ab = float(s.alphas_cumprod[int(t)])
        eps = (x.double() - math.sqrt(ab) * target) / math.sqrt(1 - ab)
        out = {"epsilon": eps, "sample": target.double(),
               "v_prediction": math.sqrt(ab) * eps - math.sqrt(1 - ab) * target}[prediction_type]
        x = s.step(out.float(), t, x).prev_sample
    # Every data prediction is the target, so the last step (to sigma = 0) returns it: float32
    # rounding of x0 = (x - sqrt(1 - ab) eps) / sqrt(ab), magnified by 1 / sqrt(ab_999) = 156,
    # of values below 5: 64 ulps of that.
    torch.testing.assert_close(x, target, rtol=0, atol=64 * 2.0**-24 * 5 * 156)


def test_dpm_solver_runs_in_the_projects_sampling_loop():
    condition = torch.randn(1, 7, 8, 8, 8)
    noise = torch.randn(1, 1, 8, 8, 8)
    s = DPMSolverMultistepScheduler(SCHEDULE).set_timesteps(5)
    assert s.config.clip_sample and not s.draws_noise
    sample = sample_loop(OracleModel(), s, condition, noise)  # step(..., seed=, offset=, out=, x0_out=)
    # the oracle's x0 is 0 or 1, inside the clip range: as the test above
    torch.testing.assert_close(sample, OracleModel.target(condition), rtol=0, atol=64 * 2.0**-24 * 5 * 156)
    again = sample_loop(OracleModel(), s, condition, noise)  # a step at timesteps[0] starts a new run
    assert torch.equal(again, sample)


@pytest.mark.parametrize("options", [dict(max_batch=2), dict(tiled=True, tile_shape=(8, 8, 8), tile_overlap=4)],
                         ids=["chunked", "tiled"])
def test_dpm_solver_drives_the_full_volume_sampler(options):
    # FullVolumeSampler steps a deterministic scheduler once per timestep on a whole chunk (the
    # windows of a tiled volume are only model calls), so a multistep solver works in it as it
    # is; each chunk starts again at timesteps[0]
    volume = torch.randn(4, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = DPMSolverMultistepScheduler(SCHEDULE).set_timesteps(5)
    sampler = FullVolumeSampler(OracleModel(size_multiple=4).eval(), scheduler=scheduler, ensemble_size=3,
                                options=PlanOptions(**options), progress=False)
    result = sampler.sample(volume, seed=0, keep_samples=True)
    assert result.plan.chunk_size == 2 if "max_batch" in options else result.plan.num_windows > 1
    target = (volume[0] > 0).float()
    # the oracle's x0 is exact, so every member lands on it (float32 rounding as above)
    torch.testing.assert_close(result.samples, target.expand_as(result.samples), rtol=0,
                               atol=64 * 2.0**-24 * 5 * 156)
    assert torch.equal(result.mask, target.bool())


def test_dpm_solver_needs_fewer_steps_than_ddim_on_gaussian_data():
    # Data x0 ~ N(mu, tau^2) per element has an exact denoiser, and the probability-flow ODE
    # keeps (x_t - sqrt(ab) mu) / sqrt(ab tau^2 + 1 - ab) constant: the exact endpoint of x_T
    # is mu + tau (x_T - sqrt(ab_T) mu) / sqrt(ab_T tau^2 + 1 - ab_T). Both samplers solve that ODE.
    mu, tau = 0.3, 0.5
    x_T = torch.randn(4096, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def solve(s, steps):
        s.set_timesteps(steps)
        ab_T = float(s.alphas_cumprod[int(s.timesteps[0])])
        exact = mu + tau * (x_T - math.sqrt(ab_T) * mu) / math.sqrt(ab_T * tau**2 + 1 - ab_T)
        x = x_T.clone()
        for t in s.timesteps:
            ab = float(s.alphas_cumprod[int(t)])
            x0 = mu + math.sqrt(ab) * tau**2 / (ab * tau**2 + 1 - ab) * (x - math.sqrt(ab) * mu)
            x = s.step((x - math.sqrt(ab) * x0) / math.sqrt(1 - ab), t, x).prev_sample
        return float((x - exact).abs().max())

    ddim = {n: solve(DDIMScheduler(timestep_spacing="trailing", clip_sample=False), n) for n in (20, 100, 1000)}
    dpm = {n: solve(DPMSolverMultistepScheduler(timestep_spacing="trailing"), n) for n in (20, 100)}
    # measured: DDIM 0.25, 0.054, 0.0056; DPM-Solver++ 0.081, 0.0029
    assert dpm[20] < ddim[20] / 2 and dpm[100] < ddim[1000]  # 10x fewer steps, still closer
    # the order: 5x the steps cut a first-order error about 5x, a second-order one about 25x
    assert ddim[20] / ddim[100] < 8 and dpm[20] / dpm[100] > 15


def test_dpm_solver_refuses_steps_out_of_order():
    s = DPMSolverMultistepScheduler().set_timesteps(5)
    x, eps = _x_eps()
    t = s.timesteps.tolist()
    s.step(eps, t[0], x)
    with pytest.raises(ValueError, match=f"got timestep {t[2]}, expected {t[1]} \\(step 1\\)"):
        s.step(eps, t[2], x)
    with pytest.raises(ValueError, match="is not one of the 5 timesteps"):
        DPMSolverMultistepScheduler().set_timesteps(5).step(eps, 998, x)


def test_schedulers_by_name_for_the_sample_command():
    ddim = make_scheduler("ddim", SCHEDULE, 20, eta=0.5, prediction_type="v_prediction")
    assert isinstance(ddim, DDIMScheduler) and ddim.eta == 0.5 and ddim.timestep_spacing == "patchddm"
    assert ddim.prediction_type == "v_prediction" and ddim.num_inference_steps == 20
    assert isinstance(make_scheduler("ddpm", SCHEDULE, 50), DDPMScheduler)
    dpm = make_scheduler("dpmsolver++", SCHEDULE, 5)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.clip_sample and dpm.num_inference_steps == 5
    with pytest.raises(ValueError, match="scheduler must be one of"):
        make_scheduler("pndm", SCHEDULE, 5)
    with pytest.raises(ValueError, match="eta applies to the ddim scheduler only"):
        make_scheduler("dpmsolver++", SCHEDULE, 5, eta=0.5)


# -- the README example ----------------------------------------------------------------------------

README_SETUP = """
import torch
from patchddm_fast.diffusion import DDIMScheduler, DPMSolverMultistepScheduler
from patchddm_fast.nn import UNet3D, UNetConfig

# a PatchDDM network (here a tiny untrained one; patchddm_fast.nn.load_checkpoint gives a trained one)
model = UNet3D(UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1)).eval()
condition = torch.randn(1, 7, 16, 16, 16)  # the 4 MR channels and 3 coordinate channels
"""
README_LOOP = """
scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          set_alpha_to_one=False, timestep_spacing="trailing")
scheduler.set_timesteps(20)
sample = torch.randn_like(condition[:, :1]) * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:
        noise_pred = model(torch.cat([condition, sample], dim=1), t)
        sample = scheduler.step(noise_pred, t, sample, eta=0.0).prev_sample

# DPM-Solver++(2M) from the same config: 5 steps
scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
scheduler.set_timesteps(5)
sample = torch.randn_like(condition[:, :1]) * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:
        noise_pred = model(torch.cat([condition, sample], dim=1), t)
        sample = scheduler.step(noise_pred, t, sample).prev_sample
mask = sample > 0.5  # the tumour
"""
README_EXAMPLE = README_SETUP + README_LOOP  # for README.md, as one ```python block


def _run(code: str, namespace: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation in the documented use
        exec(compile(code, "README example", "exec"), namespace)
    return namespace


def test_readme_example_runs_as_written():
    namespace = _run(README_EXAMPLE, {})
    assert namespace["mask"].shape == (1, 1, 16, 16, 16) and bool(namespace["sample"].isfinite().all())


def test_readme_loop_with_an_oracle_lands_on_the_target():
    condition = torch.randn(1, 7, 8, 8, 8)

    def oracle(x, t):  # the README calls model(x, t) with a 0-d timestep
        return OracleModel()(x, t.reshape(1))

    imports = "\n".join(line for line in README_SETUP.splitlines() if line.startswith(("import", "from")))
    namespace = _run(imports + README_LOOP, {"model": oracle, "condition": condition})
    assert torch.equal(namespace["mask"], OracleModel.target(condition) > 0.5)
