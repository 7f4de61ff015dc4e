import pytest
import torch
import torch.nn.functional as F

from diffusion_models import LocalConvModel, OracleModel
from patchddm_fast.diffusion import (DDIMScheduler, DDPMScheduler, FullVolumeSampler, NoiseSchedule, PlanOptions,
                                     VolumeTooLargeError, member_seeds)
from patchddm_fast.ops import coord_encoding

SHAPE = (13, 10, 7)  # not a multiple of 4: padded to (16, 12, 8)


def _volume(shape=SHAPE, seed=0):
    return torch.randn((4,) + shape, generator=torch.Generator().manual_seed(seed))


def _sampler(model, scheduler=None, ensemble_size=1, precision="float32", **options):
    """A sampler with 4 DDIM steps unless given a scheduler; options: PlanOptions."""
    scheduler = scheduler or DDIMScheduler(NoiseSchedule.linear(), eta=0.0).set_timesteps(4)
    return FullVolumeSampler(model, scheduler=scheduler, ensemble_size=ensemble_size, precision=precision,
                             options=PlanOptions(**options), progress=False)


def test_oracle_segmentation_lands_on_the_input_grid():
    volume = _volume()
    result = _sampler(OracleModel(size_multiple=4).eval(), ensemble_size=3).sample(volume, seed=0)
    target = volume[0] > 0
    assert result.mean.shape == result.mask.shape == result.std.shape == SHAPE
    assert result.plan.padded_shape == (16, 12, 8) and result.plan.pad_before == (1, 1, 0)
    assert torch.equal(result.mask, target)
    assert result.mask.dtype == torch.bool and result.mean.dtype == torch.float32
    assert float((result.mean - target.float()).abs().max()) < 0.06  # the 0.01 * x_T the last DDIM step leaves


def test_padding_and_cropping_keep_the_grid():
    volume = _volume()
    model = LocalConvModel(size_multiple=4).eval()
    ours = _sampler(model, ensemble_size=2).sample(volume, seed=4, keep_samples=True)
    padded = F.pad(volume, (0, 1, 1, 1, 1, 2))  # centred: (16, 12, 8), before = (1, 1, 0)
    full = _sampler(model, ensemble_size=2).sample(padded, seed=4, keep_samples=True)
    assert full.plan.padded_shape == full.plan.shape == (16, 12, 8)
    assert torch.equal(ours.samples, full.samples[:, 1:14, 1:11, 0:7])


def test_model_input_holds_full_volume_coordinates_and_one_buffer():
    seen = []

    class Spy(LocalConvModel):
        def forward(self, x, t):
            seen.append(x.clone())
            return super().forward(x, t)

    model = Spy(size_multiple=4).eval()
    volume = _volume()
    _sampler(model, ensemble_size=2, member_bytes=1).sample(volume, seed=0)
    assert len(seen) == 4  # one call per step (member_bytes given: no memory probe)
    x = seen[0]
    assert x.shape == (2, 8, 16, 12, 8)
    coords = coord_encoding((16, 12, 8), (0, 0, 0), (16, 12, 8))
    assert torch.equal(x[:, 4:7], coords.expand(2, -1, -1, -1, -1))
    assert torch.equal(x[:, :4, 1:14, 1:11, 0:7], volume.expand(2, -1, -1, -1, -1))
    assert float(x[:, :4, 0].abs().max()) == 0  # zero padding
    assert len({c[0] for c in model.calls}) == 1  # one buffer for every step: no torch.cat per step
    # pad_to gives the coordinates of a larger (training-size) volume
    seen.clear()
    _sampler(model, member_bytes=1, pad_to=(20, 12, 12)).sample(volume, seed=0)
    assert seen[0].shape[2:] == (20, 12, 12)
    torch.testing.assert_close(seen[0][0, 4:7], coord_encoding((20, 12, 12), (0, 0, 0), (20, 12, 12)))


@pytest.mark.parametrize("scheduler", ["ddim", "ddim_eta", "ddpm"])
def test_chunked_and_batched_ensembles_are_identical(scheduler):
    make = {"ddim": lambda: DDIMScheduler().set_timesteps(4),
            "ddim_eta": lambda: DDIMScheduler(eta=0.7).set_timesteps(4),
            "ddpm": lambda: DDPMScheduler().set_timesteps(4)}[scheduler]
    volume = _volume()
    model = LocalConvModel(size_multiple=4, per_sample=True).eval()
    batched = _sampler(model, scheduler=make(), ensemble_size=4).sample(volume, seed=7, keep_samples=True)
    assert batched.plan.chunk_size == 4
    for max_batch in (1, 3):  # 3: chunks of 3 and 1
        chunked = _sampler(model, scheduler=make(), ensemble_size=4, max_batch=max_batch).sample(
            volume, seed=7, keep_samples=True)
        assert chunked.plan.chunk_size == max_batch
        assert chunked.seeds == batched.seeds
        assert torch.equal(chunked.samples, batched.samples)
        assert torch.equal(chunked.mean, batched.mean) and torch.equal(chunked.std, batched.std)
    if scheduler == "ddim":
        # with a model whose float rounding depends on the batch size, only that rounding differs
        plain = LocalConvModel(size_multiple=4).eval()
        a = _sampler(plain, scheduler=make(), ensemble_size=4).sample(volume, seed=7)
        b = _sampler(plain, scheduler=make(), ensemble_size=4, max_batch=3).sample(volume, seed=7)
        # LocalConvModel's float32 rounding depends on the batch; 4 DDIM steps magnify a 1e-7 forward
        # difference by up to 1/sqrt(alpha_bar_999) = 156 (2e-5); 1e-4 leaves a 5x margin.
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-4)


def test_statistics_and_seeds():
    volume = _volume()
    model = LocalConvModel(size_multiple=4, per_sample=True).eval()
    sampler = _sampler(model, scheduler=DDIMScheduler(eta=1.0).set_timesteps(4), ensemble_size=4)
    a = sampler.sample(volume, seed=3, keep_samples=True)
    assert a.seeds == member_seeds(3, 4) and len(set(a.seeds)) == 4
    # Default float32 tolerances (1.3e-6 relative): the same sum in another order.
    torch.testing.assert_close(a.mean, a.samples.mean(0))
    # The sampler's running (mean, M2) std against torch's two-pass one, float32 over 4 members
    # of order 1: a few ulps, with a margin of 1e-5 absolute for the sqrt near zero.
    torch.testing.assert_close(a.std, a.samples.std(0, correction=0), rtol=1e-4, atol=1e-5)
    assert torch.equal(a.mask, a.mean > 0.5)
    b = sampler.sample(volume, seed=3)
    assert torch.equal(a.mean, b.mean)
    c = sampler.sample(volume, seed=4)
    assert not torch.allclose(a.mean, c.mean)
    # a recorded member seed reproduces that member alone
    one = sampler.sample(volume, seeds=[a.seeds[2]], keep_samples=True)
    assert torch.equal(one.samples[0], a.samples[2]) and float(one.std.abs().max()) == 0
    # member seeds depend on (seed, index) only
    assert member_seeds(3, 6)[:4] == a.seeds


def test_memory_plan_sets_the_chunk_size():
    volume = _volume()
    model = LocalConvModel(size_multiple=4).eval()
    sampler = _sampler(model, ensemble_size=6)
    plan = sampler.plan(volume)
    assert plan.chunk_size == 6 and plan.member_bytes > 0
    # forward peak: conv1 output (6 ch) and tanh (6 ch) alive together, float32, per voxel at least
    assert plan.member_bytes >= 12 * 4 * 16 * 12 * 8
    budget = plan.fixed_bytes + 2 * plan.member_bytes
    tight = _sampler(model, ensemble_size=6, memory_budget=int(budget / 0.9) + 1).plan(volume)
    assert tight.chunk_size == 2
    with pytest.raises(VolumeTooLargeError, match=r"needs about .* but only .* is available.*tiled=True"):
        _sampler(model, ensemble_size=6, memory_budget=plan.fixed_bytes).sample(volume, seed=0)


def test_tiled_pointwise_model_equals_untiled():
    volume = _volume((16, 12, 12))
    model = LocalConvModel(pointwise=True).eval()
    whole = _sampler(model, ensemble_size=2).sample(volume, seed=1, keep_samples=True)
    tiled = _sampler(model, ensemble_size=2, tiled=True, tile_shape=(8, 8, 8), tile_overlap=2).sample(
        volume, seed=1, keep_samples=True)
    assert tiled.plan.window_shape == (8, 8, 8) and tiled.plan.num_windows == 3 * 2 * 2
    # A pointwise model sees the same voxels either way: only the float32 blending weights'
    # rounding (sum of weights / total, a few ulps) differs.
    torch.testing.assert_close(tiled.samples, whole.samples, rtol=1e-5, atol=1e-5)


def test_tiled_local_model_is_close_to_untiled():
    volume = _volume((16, 16, 16))
    model = LocalConvModel().eval()
    whole = _sampler(model, ensemble_size=1).sample(volume, seed=1, keep_samples=True)
    tiled = _sampler(model, tiled=True, tile_shape=12, tile_overlap=8).sample(volume, seed=1, keep_samples=True)
    diff = (tiled.samples - whole.samples).abs()
    # the receptive field (2 voxels) reaches a window's zero padding only where its weight is
    # small; DDIM magnifies noise errors by up to 1 / sqrt(alpha_bar_999) = 158 in x0
    assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.05
    assert int((tiled.mask != whole.mask).sum()) <= 4


def test_precision_bf16():
    volume = _volume()
    model = LocalConvModel(size_multiple=4).eval()
    low = _sampler(model, precision="bfloat16").sample(volume, seed=2)
    assert model.autocast_seen[-1] and low.mean.dtype == torch.float32
    full = _sampler(model).sample(volume, seed=2)
    assert float((low.mean - full.mean).abs().mean()) < 0.02


def test_bad_inputs():
    model = LocalConvModel(size_multiple=4).eval()
    sampler = _sampler(model)
    volume = _volume()
    with pytest.raises(ValueError, match="has 3 channels, but the model takes 4 image channels"):
        sampler.sample(volume[:3], seed=0)
    bad = volume.clone()
    bad[2, 0, 0, 0] = float("nan")
    bad[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN or infinite voxels \(channels \[2\]\)"):
        sampler.sample(bad, seed=0)
    with pytest.raises(ValueError, match="one volume at a time"):
        sampler.sample(volume.expand(2, -1, -1, -1, -1), seed=0)
    with pytest.raises(ValueError, match="must be \\(C, D, H, W\\)"):
        sampler.sample(volume[0], seed=0)

    class TwoChannels(LocalConvModel):
        def forward(self, x, t):
            return super().forward(x, t).expand(-1, 2, -1, -1, -1)

    with pytest.raises(ValueError, match=r"expected the predicted noise of x_t, shape \(1, 1, 4, 4, 4\)"):
        _sampler(TwoChannels(size_multiple=4).eval()).sample(volume, seed=0)
    with pytest.raises(ValueError, match="tile_shape .* multiple of size_multiple 4"):
        _sampler(model, tiled=True, tile_shape=6)
    with pytest.raises(ValueError, match="ensemble_size must be a positive int"):
        _sampler(model, ensemble_size=0)

    class Exploding(LocalConvModel):
        def forward(self, x, t):
            return super().forward(x, t) * float("nan")

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        _sampler(Exploding(size_multiple=4).eval(), member_bytes=1).sample(volume, seed=0)


def test_training_mode_warns():
    with pytest.warns(UserWarning, match="training mode"):
        _sampler(LocalConvModel(size_multiple=4), member_bytes=1).sample(_volume(), seed=0)


def test_the_memory_probe_of_a_large_volume_measures_the_slab_pass():
    # The U-Net runs the levels of a large volume in slabs (nn.streaming), which its small
    # probe's tensors are too small for on their own: the probe must measure the slab pass, or
    # the plan would ask for the whole-tensor pass's memory (here 1.5x) and refuse volumes that
    # fit. Counted exactly on fake tensors at the window's size, both ways.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from patchddm_fast.diffusion.memory import LiveTensorBytes
    from patchddm_fast.nn import SMALL, UNet3D

    def counted(planes):
        with FakeTensorMode():
            model = UNet3D(SMALL).eval()
            model.slab_planes = planes
            x, t = torch.empty((1, SMALL.in_channels) + (128,) * 3), torch.zeros(1, dtype=torch.int64)
            with LiveTensorBytes(list(model.parameters()) + [x, t], fake_tensors=True) as tracker, torch.no_grad():
                out = model(x, t)
                del out
            return tracker.peak / 128 ** 3

    model = UNet3D(SMALL).eval()
    sampler = _sampler(model, image_channels=4)
    sampler.plan(torch.zeros((4,) + (128,) * 3))
    (estimate,) = sampler._forward_bytes_per_voxel.values()
    slabs, whole = counted(model.slab_planes), counted(None)
    # The probe (32^3) holds a slab of 8 of its 32 planes where the volume holds 8 of 128:
    # measured 1.07x the volume's slab pass, against 1.48x for the whole-tensor pass.
    assert slabs <= estimate <= 1.15 * slabs < whole
    assert model.slab_min_bytes is None  # the probe's threshold is put back
