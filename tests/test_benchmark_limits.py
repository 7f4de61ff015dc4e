"""The counting behind benchmarks/limits.py and benchmarks/scaling.py: FLOPs from module hooks
against torch's own FlopCounterMode, least bytes against the ops' real inputs and outputs,
live-tensor bytes on fake tensors against a real run, and the capacity arithmetic."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import limits, scaling  # noqa: E402
from benchmarks.memory import _unet_pass_peak, held_bytes, storage_tracker, unet_pass_bytes  # noqa: E402
from patchddm_fast.nn import PRESETS, UNet3D  # noqa: E402

TINY = PRESETS["small"].replace(model_channels=4, channel_mult=(1, 2), groups=2)


def _model(fused: bool) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(TINY, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["baseline", "fused"])
def test_hook_flops_equal_flop_counter(fused):
    model = _model(fused)
    x = torch.randn(2, 8, 8, 12, 8)
    t = torch.tensor([3, 700])
    with FlopCounterMode(display=False) as counter, limits.LayerFlops(model) as hooks:
        model(x, t).square().mean().backward()
    counts = counter.get_flop_counts()["Global"]
    forward = sum(v for k, v in counts.items() if "backward" not in str(k) and str(k) != "aten.mm")
    assert hooks.forward == forward
    assert hooks.train_step == counter.get_total_flops()
    # the first convolution's input needs no gradient: less than 3x the forward
    assert hooks.forward < hooks.train_step < 3 * hooks.forward


def test_fake_counts_equal_real_counts():
    model = _model(False)
    with limits.LayerFlops(model) as hooks:
        model(torch.randn(1, 8, 16, 8, 8), torch.tensor([5]))
    counted = limits.unet_flops(TINY, (16, 8, 8))
    assert counted["forward"] == hooks.forward
    assert counted["train_step"] == hooks.train_step
    assert counted["voxels"] == 16 * 8 * 8


def test_paper_flops_grow_with_voxels():
    small, large = limits.unet_flops("paper", (64, 64, 64)), limits.unet_flops("paper", (64, 64, 128))
    fixed = 2 * small["forward"] - large["forward"]  # the part that no voxel pays: the time embedding
    assert 0 < fixed < small["forward"] / 1000
    assert large["forward"] - fixed == 2 * (small["forward"] - fixed)
    assert large["train_step"] > 2 * large["forward"]


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add,skip", [(False, False), (True, False), (True, True)])
def test_group_norm_silu_bytes_are_the_ops_inputs_and_outputs(dtype, add, skip):
    from patchddm_fast.ops.group_norm_silu import fake_backward, fake_forward

    shape, groups = (2, 6, 5, 4, 3), 3
    x = torch.empty(shape, dtype=dtype)
    extra = dict(skip=torch.empty_like(x) if skip else None, add=torch.empty(2, 6, dtype=dtype) if add else None)
    weight, bias = torch.empty(6, dtype=dtype), torch.empty(6, dtype=dtype)
    outputs = fake_forward(x, extra["skip"], extra["add"], weight, bias, groups, 1e-5)
    expected = _nbytes(x, extra["skip"], extra["add"], weight, bias, *outputs)
    assert limits.group_norm_silu_bytes(shape, x.element_size(), add=add, skip=skip, groups=groups) == expected

    y, average, mean, rstd = outputs
    grads = fake_backward(torch.empty_like(y), torch.empty_like(y) if skip else None, x, extra["add"], weight, bias,
                          mean, rstd, groups, 0.5 if skip else 1.0)
    read = _nbytes(y, average if skip else None, x, extra["add"], weight, bias, mean, rstd)
    written = _nbytes(grads[0], *(g.to(dtype) for g in grads[1:] if g.numel()))
    assert limits.group_norm_silu_bytes(shape, x.element_size(), add=add, skip=skip, groups=groups,
                                        backward=True) == read + written


def test_elementwise_op_bytes():
    x = torch.empty(3, 1, 4, 5, 6)
    assert limits.avg_skip_bytes(x.shape, 4) == 3 * x.nbytes
    assert limits.ddim_step_bytes(x.shape, 4) == 4 * x.nbytes  # x_t, eps in; x_prev, x0 out
    assert limits.q_sample_bytes(x.shape, 2) == x.nbytes  # bf16: x0 in, x_t out
    # 2 patches of 4 image channels at 3x4x5: read 4 + x_t, write 4 + 3 + x_t
    assert limits.assemble_input_bytes(2, 4, (3, 4, 5)) == 2 * 60 * 4 * (5 + 8)


def test_fused_op_traffic_counts_every_norm():
    traffic = limits.fused_op_traffic("small", (16, 16, 16), train=True)
    norms = sum(1 for m in UNet3D(PRESETS["small"]).modules() if type(m).__name__ == "FusedGroupNormSiLU")
    assert traffic["group_norm_silu"]["calls"] == norms
    assert traffic["group_norm_silu backward"]["calls"] == norms
    assert traffic["group_norm_silu backward"]["bytes"] > traffic["group_norm_silu"]["bytes"] > 0
    assert traffic["q_sample"]["bytes"] == 2 * 16**3 * 4
    sampling = limits.fused_op_traffic("small", (16, 16, 16), train=False, precision="bfloat16")
    assert sampling["group_norm_silu"]["bytes"] < traffic["group_norm_silu"]["bytes"]  # bf16 activations


@pytest.mark.parametrize("variant", ["baseline", "ours"])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_fake_tensor_bytes_equal_a_real_run(variant, train):
    counted = unet_pass_bytes(TINY, (16, 8, 8), 1, variant, "float32", train)
    model = _model(variant == "ours").train(train)
    real = _unet_pass_peak(model, torch.randn(1, 8, 16, 8, 8), torch.tensor([5]), "float32", train)
    assert counted == real
    assert real["weights"] == sum(p.numel() * 4 for p in model.parameters())
    # Training keeps the full-resolution level's eight 4-channel activations for backward; a
    # no-grad forward frees each as it goes but still holds a convolution's input and output.
    held = 8 if train else 2
    assert real["transient"] > held * 4 * 16 * 8 * 8 * 4


def test_storage_tracker_counts_live_tensors_once():
    base = torch.zeros(1000)
    with storage_tracker(external=[base]) as tracker:
        a = torch.ones(250)           # 1000 bytes
        view = a[10:]                 # same storage: not counted again
        b = torch.ones(500)           # 2000 bytes, peak 3000
        del a, view, b
        c = torch.ones(100)           # 400 bytes
        base.add_(1)                  # in place on an external tensor: not counted
    assert tracker.peak == 3000
    assert tracker.current == 400
    del c


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_the_tracker_counts_real_tensors_alike_by_address_and_by_identity(train):
    """The fake-tensor counts above are compared with real runs counted by identity; the
    sampler's memory plan counts by address: on real tensors both keys give the same bytes."""
    from patchddm_fast.diffusion.memory import LiveTensorBytes

    model = _model(True).train(train)
    x, t = torch.randn(1, 8, 16, 8, 8), torch.tensor([5])
    peaks = []
    for fake_tensors in (False, True):
        external = [x, t, *model.parameters(), *model.buffers()]
        with LiveTensorBytes(external, fake_tensors=fake_tensors) as tracker, torch.set_grad_enabled(train):
            out = model(x, t)
            if train:
                out.square().mean().backward()
            del out
        model.zero_grad(set_to_none=True)
        peaks.append((tracker.peak, tracker.current))
    assert peaks[0] == peaks[1] and peaks[0][0] > 0


def test_held_bytes_counts_each_storage_once():
    layer = torch.nn.Linear(10, 4)
    layer(torch.randn(3, 10)).sum().backward()
    optimizer = torch.optim.AdamW(layer.parameters())
    optimizer.step()
    params = (10 * 4 + 4) * 4
    # weights, gradients, two moments per weight and AdamW's step counters (one float each)
    assert held_bytes([layer, optimizer, layer.weight]) == params * 4 + 2 * 4


def test_fit_and_largest_cube():
    points = [scaling.Point("sample", "ours", "float32", "paper", s, 1, 1000 + 7 * s**3, 1.0, "cpu", "x")
              for s in (64, 128, 192)]
    a, b = scaling.fit_linear(points)
    assert a == pytest.approx(1000) and b == pytest.approx(7)
    edge, usable = scaling.largest_cube(a, b, 1000 + 7 * 300**3, multiple=64)
    assert edge == pytest.approx(300) and usable == 256
    assert scaling.largest_cube(a, b, 500, 64) == (0.0, 0)
    rows = scaling.capacity_table(points, 64, capacities_gib=(24,), reserve_bytes=0)
    assert rows[0]["24GiB_largest"] == int(((24 * 2**30 - 1000) / 7) ** (1 / 3) // 64) * 64
    with pytest.raises(ValueError, match="two sizes"):
        scaling.fit_linear(points[:1])


@pytest.mark.parametrize("variant", ["baseline", "ours"])
def test_counted_sampling_step_equals_a_real_step(variant):
    from benchmarks.memory import tensor_peak_bytes
    from benchmarks.workloads import sampling_step

    real = tensor_peak_bytes(sampling_step(variant, "small", 16, members=2))["total"]
    # equal up to the step's few scalars (timesteps, update coefficients): under a kilobyte
    assert scaling.sampling_step_bytes(variant, "small", 16, members=2) == pytest.approx(real, abs=1024)
