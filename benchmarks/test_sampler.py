"""One step of full-volume sampling (the paper's network, no grad), ours against the baseline
pattern, side by side: time per step and peak memory.

- baseline: the plain-PyTorch U-Net; the model input assembled with torch.cat([MR, coordinates,
  x_t]) every step (as the original does); the DDIM update in eager PyTorch, the way
  guided-diffusion writes it (x0, clip, eps, mean, randn_like noise times sigma = 0); float32.
- buffer: the same baseline U-Net, but our sampling loop: one preallocated model-input buffer
  and the fused noise update writing x_t into it (isolates what the sampler itself saves).
- ours: the fused U-Net with our sampling loop, float32; ours-bf16: under bf16 autocast.

Each case records its peak memory in extra_info (CPU: peak RSS growth of one step in a fresh
process; GPU: max_memory_allocated) and its ratios to the baseline measured earlier in the
same session (time_ratio, memory_ratio: this case / baseline). On the CPU, where peak RSS
varies from run to run with the C allocator's arenas (by +-40% here), it also records the
peak of the live tensors of one step (tensor_peak_mib, exact and repeatable, counted by
patchddm_fast.diffusion.memory) and its ratio (tensor_memory_ratio).

    pytest benchmarks/test_sampler.py --benchmark-only                 # CPU: 64^3, float32
    pytest benchmarks/test_sampler.py --benchmark-only --paper-scale   # + 256^3 (GPU default)
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.memory import cpu_peak_bytes, cuda_peak_bytes

VARIANTS = {  # name -> (fused U-Net, our buffer and fused update, precision)
    "baseline": (False, False, "float32"),
    "buffer": (False, True, "float32"),
    "ours": (True, True, "float32"),
    "ours-bf16": (True, True, "bfloat16"),
}
STEPS, STEP_INDEX = 20, 1  # a DDIM step from the middle of a 20-step run


def setup_step(variant: str, size: int, device: str = "cpu"):
    """A workload for benchmarks.memory: one DDIM sampling step on a size^3 volume."""
    from patchddm_fast.diffusion import DDIMScheduler
    from patchddm_fast.diffusion.sampling import predict_noise
    from patchddm_fast.nn import paper_unet
    from patchddm_fast.ops import assemble_input, coord_encoding

    fused, our_loop, precision = VARIANTS[variant]
    torch.manual_seed(0)
    model = paper_unet(fused=fused).to(device).eval()
    shape = (size,) * 3
    image = torch.randn((1, 4) + shape, device=device)
    scheduler = DDIMScheduler().set_timesteps(STEPS)
    t = int(scheduler.timesteps[STEP_INDEX])
    timesteps = torch.full((1,), t, dtype=torch.int64, device=device)

    if our_loop:
        buffer = torch.empty((1, 8) + shape, device=device)
        assemble_input(image, [0, 0, 0], out=buffer)  # once per volume, not per step
        buffer[:, 7:8].normal_()
        x_t, x0 = buffer[:, 7:8], torch.empty((1, 1) + shape, device=device)

        def run():
            with torch.no_grad():
                eps = predict_noise(model, buffer, t, x_t.shape, precision)
                scheduler.step(eps, t, x_t, out=x_t, x0_out=x0)

        return run

    coords = coord_encoding(shape, (0, 0, 0), shape, device=device)[None]  # precomputed, as the dataset does
    state = {"x": torch.randn((1, 1) + shape, device=device)}
    ab = float(scheduler.alphas_cumprod[t])
    ab_prev = float(scheduler.alphas_cumprod[int(scheduler.timesteps[STEP_INDEX + 1])])

    def run():
        with torch.no_grad():
            x = state["x"]
            eps = model(torch.cat([image, coords, x], dim=1), timesteps)
            x0 = (math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps).clamp(-1, 1)
            eps = (math.sqrt(1 / ab) * x - x0) / math.sqrt(1 / ab - 1)
            sigma = 0.0
            mean = x0 * math.sqrt(ab_prev) + math.sqrt(1 - ab_prev - sigma**2) * eps
            state["x"] = mean + sigma * torch.randn_like(x)

    return run


_RESULTS: dict[tuple, tuple[float, int, int | None]] = {}


def _measure(benchmark, device, rounds, size, variant):
    from patchddm_fast.diffusion.memory import forward_peak_bytes

    run = setup_step(variant, size, device=device.type)
    tensor_peak = None
    if device.type == "cuda":
        run()
        peak = cuda_peak_bytes(run)
        sync = torch.cuda.synchronize
    else:
        peak = cpu_peak_bytes("benchmarks.test_sampler:setup_step", variant=variant, size=size)
        tensor_peak = forward_peak_bytes(run)
        sync = lambda: None  # noqa: E731

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    _RESULTS[(device.type, size, variant)] = (seconds, peak, tensor_peak)
    info = dict(size=size, variant=variant, precision=VARIANTS[variant][2], peak_mib=round(peak / 2**20, 1))
    if tensor_peak is not None:
        info.update(tensor_peak_mib=round(tensor_peak / 2**20, 1))
    if (device.type, size, "baseline") in _RESULTS and variant != "baseline":
        base_seconds, base_peak, base_tensor_peak = _RESULTS[(device.type, size, "baseline")]
        info.update(time_ratio=round(seconds / base_seconds, 3), memory_ratio=round(peak / base_peak, 3))
        if tensor_peak is not None:
            info.update(tensor_memory_ratio=round(tensor_peak / base_tensor_peak, 3))
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("variant", ["baseline", "buffer", "ours"])
def test_cpu_step_64(benchmark, bench_device, variant):
    if bench_device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")
    benchmark.group = "sampler step paper 64^3 cpu fp32"
    _measure(benchmark, bench_device, 2, 64, variant)


@pytest.mark.parametrize("variant", ["baseline", "buffer", "ours", "ours-bf16"])
def test_paper_step_256(benchmark, bench_device, paper_scale, variant):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "sampler step paper 256^3"
    _measure(benchmark, bench_device, 5, 256, variant)
