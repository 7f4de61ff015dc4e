"""The fused GroupNorm + SiLU against the original's eager sequence at the paper's levels.

    python -m benchmarks.norm_levels                        # 1 and 2 threads, float32 and bfloat16
    python -m benchmarks.norm_levels --threads 1 --rounds 12 --levels 64,32,16,128
    python -m benchmarks.norm_levels --threads 1 --layout channels_last   # as the trainer feeds CPUs

Shapes (batch 1, 29 groups as the paper's network): 29 channels at 64^3 (and 128^3, the
full-resolution level of a 128^3 patch; opt-in), 87 channels at 32^3, 116 at 16^3. Modes:
`train` (forward, then torch.autograd.grad of y, x, weight and bias with a fixed upstream
gradient, as in a training step where x's gradient goes on to a convolution) and `forward`
(no_grad). `eager` is the original's GroupNorm32 + SiLU: F.group_norm in float32 on
x.float(), cast back to x's dtype, F.silu; `ours` is patchddm_fast.ops.group_norm_silu.
Layouts (`--layout`): x and the upstream gradient contiguous (NCDHW), or channels_last_3d
(NDHWC), the same for both.

Ours and eager run alternately, round after round, in this one process, and each keeps its
fastest round in wall time and, separately, in process CPU time: on a machine shared with
other jobs the fastest round is the one they disturbed least. Ours is checked first against
eager on the contiguous x (float32: within float32 rounding of the sums, see TOLERANCE). Not
against eager on a channels-last x: ATen's channels-last GroupNorm loses precision on large
channels (29 ch 128^3 float32: 2e-4 to 7e-4 relative to the float64 formula, measured, where
eager on the contiguous x and ours in either layout are within 7e-8).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

GROUPS = 29
LEVELS = {64: (29, 64), 32: (87, 32), 16: (116, 16), 128: (29, 128)}  # edge -> (channels, edge)
# Relative tolerance (norm of the difference over the norm) of ours against eager. float32:
# both compute in float32, summing in another order (ours: float lanes per 1024-element
# tile, double across tiles). bfloat16: eager rounds twice (the norm's output, then SiLU's),
# ours once, so elements differ by a bfloat16 step or two (2^-8 relative each).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2 ** -7}


def eager(x, weight, bias):
    return F.silu(F.group_norm(x.float(), GROUPS, weight, bias, 1e-5).type(x.dtype))


def ours(x, weight, bias):
    from patchddm_fast.ops import group_norm_silu

    return group_norm_silu(x, weight, bias, GROUPS, 1e-5)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def inputs(level: int, dtype: torch.dtype, layout: str = "contiguous"):
    channels, edge = LEVELS[level]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, channels, edge, edge, edge, generator=g) * 2 + 0.5).to(dtype)
    weight = torch.rand(channels, generator=g) + 0.5
    bias = torch.randn(channels, generator=g)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    fmt = LAYOUTS[layout]
    return x.contiguous(memory_format=fmt), weight, bias, grad.contiguous(memory_format=fmt)


def one_round(f, x, weight, bias, grad, mode):
    leaves = [t.detach().requires_grad_(mode == "train") for t in (x, weight, bias)]
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "train":
        y = f(*leaves)
        torch.autograd.grad(y, leaves, grad)
    else:
        with torch.no_grad():
            f(*leaves)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(level: int, dtype: torch.dtype, mode: str, rounds: int, layout: str = "contiguous") -> dict:
    x, weight, bias, grad = inputs(level, dtype, layout)
    with torch.no_grad():
        a, b = ours(x, weight, bias).float(), eager(x.contiguous(), weight, bias).float()
    error = ((a - b).norm() / b.norm()).item()
    if not error < TOLERANCE[dtype]:
        raise AssertionError(f"ours differs from eager at {level}^3 {dtype}: relative error {error:.2e}")
    best = {name: [float("inf"), float("inf")] for name in ("ours", "eager")}
    for r in range(rounds + 1):
        for name, f in (("ours", ours), ("eager", eager)):
            wall, cpu = one_round(f, x, weight, bias, grad, mode)
            if r:  # round 0 warms up
                best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    channels, edge = LEVELS[level]
    return dict(shape=f"{channels}ch {edge}^3", dtype=str(dtype).removeprefix("torch."), mode=mode, layout=layout,
                threads=torch.get_num_threads(), ours_ms=best["ours"][0] * 1e3, eager_ms=best["eager"][0] * 1e3,
                ours_cpu_ms=best["ours"][1] * 1e3, eager_cpu_ms=best["eager"][1] * 1e3,
                speedup=best["eager"][0] / best["ours"][0], cpu_speedup=best["eager"][1] / best["ours"][1])


HEADER = ("| threads | layout | dtype | mode | shape | ours ms (CPU ms) | eager ms (CPU ms) | speedup wall "
          "| speedup CPU |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    return (f"| {r['threads']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['shape']} | {r['ours_ms']:.2f} ({r['ours_cpu_ms']:.2f}) "
            f"| {r['eager_ms']:.2f} ({r['eager_cpu_ms']:.2f}) | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    parser.add_argument("--levels", default="64,32,16", help="level edges among 128,64,32,16 (default 64,32,16)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="train,forward")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of each (default 8)")
    parser.add_argument("--layout", default="contiguous", choices=sorted(LAYOUTS),
                        help="memory layout of x and its gradient, for both (default contiguous)")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    results = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            for mode in args.modes.split(","):
                for level in map(int, args.levels.split(",")):
                    results.append(compare(level, dtype, mode, args.rounds, args.layout))
                    print(row(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
