"""End to end: seconds to segment one whole volume with the paper's protocol, 20 DDIM steps for
each of 5 ensemble members, then the ensemble's mean and standard deviation; ours against the
baseline pattern, side by side.

- baseline: the original's loop (benchmarks.workloads.full_volume_sampling): one member at a
  time, torch.cat([MR, coordinates, x_t]) at every step, the plain-PyTorch U-Net, the DDIM
  update in eager PyTorch, torch.stack of the samples for mean and std; float32.
- ours: patchddm_fast.diffusion.FullVolumeSampler: the input buffer written once, the members
  batched as far as memory allows, the fused U-Net and fused noise updates; float32, and
  bf16 autocast on a GPU.
(Patches per second in training are measured in benchmarks/test_train.py.)

Both start every member from the same x_T, so before timing, a short run (2 steps, 2 members)
of each must agree with the baseline's mean and std. extra_info: seconds_per_volume,
steps_per_s (network passes of one member per second), peak_mib (GPU: max_memory_allocated
over the timed volume; CPU: peak RSS growth of a fresh process over a 2-step run: the peak is
reached in the first step, later steps allocate nothing new), and time_ratio / speedup /
memory_ratio against the baseline. One timed round per variant (the short check before it is
the warm-up): a volume takes seconds on a GPU and minutes on a loaded CPU.

Sizes: CPU: the small U-Net on a 16^3 volume; paper scale (GPU): the paper's U-Net on 256^3.

    pytest benchmarks/test_end_to_end.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory import cpu_peak_bytes
from benchmarks.workloads import assert_matches, full_volume_sampling, record, timed

STEPS, MEMBERS = 20, 5
VARIANTS = (("baseline", "float32"), ("ours", "float32"), ("ours", "bfloat16"))


def volume_size(paper: bool, device: str) -> tuple[str, int]:
    return ("paper", 256) if paper and device == "cuda" else ("small", 16)


@pytest.mark.parametrize("variant,precision", VARIANTS, ids=[f"{v}-{p}" for v, p in VARIANTS])
def test_full_volume(benchmark, bench_device, paper_scale, variant, precision):
    device = bench_device.type
    if paper_scale and device != "cuda":
        pytest.skip("the paper's 256^3 volume x 100 network passes takes hours on a CPU; run it on a GPU")
    if precision == "bfloat16" and device != "cuda":
        pytest.skip("bf16 autocast is timed on a GPU")
    preset, size = volume_size(paper_scale, device)
    common = dict(preset=preset, size=size, device=device)
    run = full_volume_sampling(variant, members=MEMBERS, steps=STEPS, precision=precision, **common)

    def check():
        expected = full_volume_sampling("baseline", members=2, steps=2, **common)()
        actual = full_volume_sampling(variant, members=2, steps=2, precision=precision, **common)()
        assert_matches(actual, expected, precision, what=f"full-volume mean and std, {variant} {precision}")

    check()
    benchmark.group = f"end to end {preset} {size}^3 x{MEMBERS} members {STEPS} steps {device}"
    if device == "cuda":
        # one volume is long enough to time once; its peak is read over that same run
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(timed(run, bench_device), rounds=1, warmup_rounds=0, iterations=1)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = cpu_peak_bytes("benchmarks.workloads:full_volume_sampling", **dict(
            common, variant=variant, members=MEMBERS, steps=2, precision=precision))
        benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    entry = record(benchmark, f"{variant}-{precision}", "baseline-float32", peak_bytes=peak)
    benchmark.extra_info.update(seconds_per_volume=round(entry["seconds"], 3), steps=STEPS, members=MEMBERS,
                                steps_per_s=round(STEPS * MEMBERS / entry["seconds"], 2))
