"""The no-grad decoder upsampling: nearest x2 + 3x3x3 convolution by output parity (ours,
patchddm_fast.nn.unet.upsample_conv_by_parity) against conv(F.interpolate(x)) (the original).

    python -m benchmarks.upsample_parity                     # 29 channels, 64^3 -> 128^3, 1 thread
    python -m benchmarks.upsample_parity --edge 32 --threads 2 --rounds 6

Alternating rounds in one process, the fastest of each in wall and in process CPU time; then
the peak of live tensors of each in float32, counted on fake tensors (LiveTensorBytes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def counted_peak(run, channels: int, edge: int) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from patchddm_fast.diffusion.memory import LiveTensorBytes
    from patchddm_fast.nn.unet import Upsample

    with FakeTensorMode():
        up = Upsample(channels)
        x = torch.empty(1, channels, edge, edge, edge)
        with torch.no_grad(), LiveTensorBytes(list(up.parameters()) + [x], fake_tensors=True) as tracker:
            out = run(x, up.conv)
            del out
        return tracker.peak


def main(argv=None) -> list[dict]:
    from patchddm_fast.nn.unet import Upsample, upsample_conv_by_parity

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=29)
    parser.add_argument("--edge", type=int, default=64, help="input edge (output is twice it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    up = Upsample(args.channels)
    x = torch.randn(1, args.channels, args.edge, args.edge, args.edge)
    with torch.no_grad():  # checked first: float32 sums regrouped, so float32 rounding apart
        ours, reference = upsample_conv_by_parity(x, up.conv), plain(x, up.conv)
    error = ((ours - reference).norm() / reference.norm()).item()
    if not error < 1e-5:
        raise AssertionError(f"parity upsampling differs from the plain pair: relative error {error:.2e}")
    del ours, reference
    peaks = {name: counted_peak(f, args.channels, args.edge) / 2**20
             for name, f in (("ours", upsample_conv_by_parity), ("plain", plain))}
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        best = {"ours": [float("inf")] * 2, "plain": [float("inf")] * 2}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            xx = x.to(dtype)
            for _ in range(args.rounds):
                for name, f in (("ours", upsample_conv_by_parity), ("plain", plain)):
                    wall, cpu = time.perf_counter(), time.process_time()
                    f(xx, up.conv)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
        r = dict(dtype=str(dtype).removeprefix("torch."), ours_ms=best["ours"][0] * 1e3, ours_cpu_ms=best["ours"][1] * 1e3,
                 plain_ms=best["plain"][0] * 1e3, plain_cpu_ms=best["plain"][1] * 1e3,
                 speedup=best["plain"][0] / best["ours"][0],)
        results.append(r)
        print(f"{args.channels} ch {args.edge}^3 -> {2 * args.edge}^3, {r['dtype']}, {args.threads} thread(s): "
              f"ours {r['ours_ms']:.1f} ms (CPU {r['ours_cpu_ms']:.1f}), plain {r['plain_ms']:.1f} ms "
              f"(CPU {r['plain_cpu_ms']:.1f}), {r['speedup']:.2f}x", flush=True)
    print(f"peak of live tensors, float32 (counted): ours {peaks['ours']:.1f} MiB, plain {peaks['plain']:.1f} MiB")
    return results, peaks


if __name__ == "__main__":
    main()
