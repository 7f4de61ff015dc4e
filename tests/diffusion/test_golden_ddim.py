"""The original PatchDDM's DDIM sampling, reproduced from its golden data (../shared/golden)."""

import os

import numpy as np
import pytest
import torch

from patchddm_fast.diffusion import DDIMScheduler, FullVolumeSampler, NoiseSchedule, PlanOptions, original_ddim_sample
from patchddm_fast.nn import load_original_checkpoint

GOLDEN_DIR = os.environ.get("PATCHDDM_GOLDEN", "/work/shared/golden")


@pytest.fixture(scope="module")
def golden():
    path = os.path.join(GOLDEN_DIR, "reference_unet_small.npz")
    if not os.path.isfile(path):
        pytest.fail(f"golden data not found: {path}; set PATCHDDM_GOLDEN to the folder holding it")
    return path, np.load(path)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "baseline"])
def test_original_ddim_reproduces_the_golden_sample(golden, fused):
    path, data = golden
    model = load_original_checkpoint(path, fused=fused)
    condition = torch.from_numpy(data["ddim_condition"])
    noise = torch.from_numpy(data["ddim_initial_noise"])
    expected = torch.from_numpy(data["ddim_sample"])
    steps = int(data["ddim_sampling_steps"])
    assert steps == 5
    sample = original_ddim_sample(model, condition, noise, steps)
    assert sample.shape == expected.shape
    error = _relative_error(sample, expected)
    print(f"golden DDIM relative error ({'fused' if fused else 'baseline'}): {error:.3e}")
    assert error < 1e-4


def test_full_volume_sampler_runs_the_original_sampler(golden):
    # The same sampling through FullVolumeSampler's buffer and loop. The golden condition's
    # channels 4-6 are random numbers, not coordinates: a wrapper puts them in place of the
    # coordinates the sampler writes, and x_T is the golden one.
    path, data = golden
    model = load_original_checkpoint(path)
    condition = torch.from_numpy(data["ddim_condition"])
    noise = torch.from_numpy(data["ddim_initial_noise"])

    def with_golden_channels(x, t):
        assert torch.equal(x[:, :4], condition[:, :4])
        return model(torch.cat([x[:, :4], condition[:, 4:7], x[:, 7:]], dim=1), t)

    class GivenNoise(FullVolumeSampler):
        def _initial_noise(self, x, seeds):
            x.copy_(noise)

    assert FullVolumeSampler(model).image_channels == 4 and FullVolumeSampler(model).size_multiple == 8
    scheduler = DDIMScheduler(NoiseSchedule.linear(), eta=0.0).set_timesteps(int(data["ddim_sampling_steps"]))
    sampler = GivenNoise(with_golden_channels, scheduler=scheduler,
                         options=PlanOptions(image_channels=4, size_multiple=8, member_bytes=1), progress=False)
    result = sampler.sample(condition[0, :4], seed=0, keep_samples=True)
    expected = torch.from_numpy(data["ddim_sample"])[0]
    assert _relative_error(result.samples, expected) < 1e-4
    assert torch.equal(result.mask, expected[0] > 0.5)
