"""The bfloat16 weight gradient of a 3x3x3 convolution: ours (patchddm::conv3d_weight_grad)
against oneDNN's (aten.convolution_backward, as autograd runs it), at the paper network's shapes.

    python -m benchmarks.conv_weight_grad                 # 2 threads, the 64^3 patch's levels
    python -m benchmarks.conv_weight_grad --threads 1,2 --levels 64,32,16,128,64w,32w

Shapes (batch 1, channels_last_3d, as the trainer feeds a CPU): level 64 is 29 -> 29 channels at
64^3, 32 is 87 -> 87 at 32^3, 16 is 116 -> 116 at 16^3, 8 is 116 at 8^3, 128 is 29 at 128^3 (the
full resolution of a 128^3 patch), 64w is 87 at 64^3, 32w 116 at 32^3 (that patch's next two
levels); `in` is the input convolution (8 -> 29 at 64^3), `out` the output one (29 -> 1 at
64^3). Both run alternately, round after round, in one
process; each keeps its fastest round. Checked first, against the float64 formula on the same
bfloat16 values (relative to the largest entry): oneDNN rounds its result to bfloat16 (about
2^-9), ours keeps float32; a wrong result would be off by order 1.

Needs a CPU with AVX512-BF16 (the kernel's instruction); elsewhere it says so and stops.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"64": (29, 29, 64), "32": (87, 87, 32), "16": (116, 116, 16), "8": (116, 116, 8), "128": (29, 29, 128),
          "64w": (87, 87, 64), "32w": (116, 116, 32), "in": (8, 29, 64),
          "out": (29, 1, 64)}  # name -> (in, out channels, edge)


def inputs(name: str):
    c_in, c_out, edge = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last_3d
    x = torch.randn(1, c_in, edge, edge, edge, generator=g).bfloat16().contiguous(memory_format=layout)
    grad = torch.randn(1, c_out, edge, edge, edge, generator=g).bfloat16().contiguous(memory_format=layout)
    weight = torch.randn(c_out, c_in, 3, 3, 3, generator=g).bfloat16().contiguous(memory_format=layout)
    return x, grad, weight


def onednn(x, grad, weight):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
                                               [0, 0, 0], 1, [False, True, False])[1]


def ours(x, grad, weight):
    from patchddm_fast.ops import conv3d_weight_grad

    return conv3d_weight_grad(x, grad)[0]


def error(result: torch.Tensor, x, grad) -> float:
    from patchddm_fast.ops import conv3d_weight_grad_reference

    exact = conv3d_weight_grad_reference(x.double(), grad.double())[0]
    return float((result.double() - exact).abs().max() / exact.abs().max())


def measure(name: str, rounds: int) -> dict:
    x, grad, weight = inputs(name)
    errors = {"ours": error(ours(x, grad, weight), x, grad), "oneDNN": error(onednn(x, grad, weight), x, grad)}
    if errors["ours"] > 1e-4 or errors["oneDNN"] > 2 ** -7:
        raise RuntimeError(f"{name}: wrong weight gradient, relative errors {errors}")
    best = {"ours": float("inf"), "oneDNN": float("inf")}
    for _ in range(rounds):
        for label, fn in (("ours", ours), ("oneDNN", onednn)):
            start = time.perf_counter()
            fn(x, grad, weight)
            best[label] = min(best[label], time.perf_counter() - start)
    return {"best": best, "errors": errors}


def main(argv=None) -> None:
    from patchddm_fast.ops.conv3d_weight_grad import kernel_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="2", help="torch thread counts, comma-separated (default 2)")
    parser.add_argument("--levels", default="64,32,16,8,in,out", help=f"among {','.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not kernel_available():
        raise SystemExit("conv_weight_grad: the kernel cannot run here (no AVX512-BF16, or the extension is not built)")
    print("| threads | shape | ours ms | oneDNN ms | speed-up | error ours | error oneDNN |")
    print("|---|---|---|---|---|---|---|")
    before, results = torch.get_num_threads(), []
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name in args.levels.split(","):
                c_in, c_out, edge = SHAPES[name]
                r = dict(measure(name, args.rounds), threads=threads, level=name)
                ms = {k: v * 1e3 for k, v in r["best"].items()}
                print(f"| {threads} | {c_in}->{c_out} ch {edge}^3 | {ms['ours']:.2f} | {ms['oneDNN']:.2f} | "
                      f"{ms['oneDNN'] / ms['ours']:.2f}x | {r['errors']['ours']:.1e} | {r['errors']['oneDNN']:.1e} |",
                      flush=True)
                results.append(r)
    finally:
        torch.set_num_threads(before)
    return results


if __name__ == "__main__":
    main()
