"""One step of full-volume sampling (no grad), ours against the baseline pattern, side by side:
time per step and peak memory. The workloads are benchmarks.workloads.sampling_step:

- baseline: the plain-PyTorch U-Net; the model input assembled with torch.cat([MR, coordinates,
  x_t]) every step (as the original does); the DDIM update in eager PyTorch, the way
  guided-diffusion writes it (x0, clip, eps, mean, randn_like noise times sigma = 0); float32.
- buffer: the same plain U-Net inside our sampling loop: one preallocated model-input buffer
  and the fused noise update writing x_t into it (isolates what the loop itself saves).
- ours: the fused U-Net with our sampling loop, float32; ours-bf16: under bf16 autocast (GPU).

Before timing, each variant's x_t after one step is checked against the baseline's (the same
weights and the same starting x_t). extra_info: peak_mib (CPU: peak RSS growth of one step in a
fresh process; GPU: max_memory_allocated), on the CPU also tensor_peak_mib (the live tensors of
one step plus what the step holds, exact and repeatable, where RSS is not), and time_ratio /
speedup / memory_ratio (/ tensor_memory_ratio) against the baseline measured in this session.

    pytest benchmarks/test_sampler.py --benchmark-only                 # CPU: small U-Net, 64^3
    pytest benchmarks/test_sampler.py --benchmark-only --paper-scale   # paper U-Net: 256^3 on a GPU, 64^3 on a CPU
"""

from __future__ import annotations

import pytest

from benchmarks.memory import tensor_peak_bytes
from benchmarks.workloads import assert_matches, measure, sampling_step

VARIANTS = {  # name -> (loop: "baseline" or "ours", fused U-Net, precision)
    "baseline": ("baseline", False, "float32"),
    "buffer": ("ours", False, "float32"),
    "ours": ("ours", True, "float32"),
    "ours-bf16": ("ours", True, "bfloat16"),
}
_TENSOR_PEAKS: dict[tuple, int] = {}


def setup_step(variant: str, preset: str, size: int, device: str = "cpu"):
    """A workload for benchmarks.memory: one DDIM step of a VARIANTS entry on a size^3 volume."""
    loop, fused, precision = VARIANTS[variant]
    return sampling_step(loop, preset, size, precision=precision, device=device, fused=fused)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_step(benchmark, bench_device, paper_scale, variant):
    device = bench_device.type
    if variant == "ours-bf16" and device != "cuda":
        pytest.skip("bf16 autocast is timed on a GPU")
    preset, size = ("paper", 256 if device == "cuda" else 64) if paper_scale else ("small", 64)
    run = setup_step(variant, preset, size, device)

    def check():
        expected = setup_step("baseline", preset, size, device)()
        assert_matches(run(), expected, VARIANTS[variant][2], what=f"x_t after one step, {variant}")

    group = f"sampler step {preset} {size}^3 {device}"
    info = dict(preset=preset, size=size, variant=variant, precision=VARIANTS[variant][2])
    if device == "cpu":
        tensor_peak = tensor_peak_bytes(setup_step(variant, preset, size, device))["total"]
        _TENSOR_PEAKS[(group, variant)] = tensor_peak
        info["tensor_peak_mib"] = round(tensor_peak / 2**20, 1)
        base = _TENSOR_PEAKS.get((group, "baseline"))
        if base and variant != "baseline":
            info["tensor_memory_ratio"] = round(tensor_peak / base, 3)
    measure(benchmark, run, device=device, group=group, name=variant, baseline="baseline",
            target="benchmarks.test_sampler:setup_step", kwargs=dict(variant=variant, preset=preset, size=size),
            rounds=5 if device == "cuda" else 2, warmup_rounds=0, check=check, **info)
