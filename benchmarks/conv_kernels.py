"""The passes of a 3x3x3 convolution, ours against oneDNN's (as autograd runs them), at the
paper network's shapes, in bfloat16 and float32: the forward and the input gradient by our
Winograd kernel (patchddm::conv3d_winograd, both dtypes), the bfloat16 weight gradient by
patchddm::conv3d_weight_grad (float32 has no weight-gradient kernel of ours).

    python -m benchmarks.conv_kernels                       # 2 threads, the 64^3 patch's levels
    python -m benchmarks.conv_kernels --threads 1,2 --levels 64,32,16,128,64w,32w --passes weight
    python -m benchmarks.conv_kernels --dtypes float32

Shapes (batch 1, channels_last_3d, as the trainer feeds a CPU): level 64 is 29 -> 29 channels at
64^3, 32 is 87 -> 87 at 32^3, 16 is 116 -> 116 at 16^3, 8 is 116 at 8^3, 128 is 29 at 128^3 (the
full resolution of a 128^3 patch), 64w is 87 at 64^3, 32w 116 at 32^3 (that patch's next two
levels); `in` is the input convolution (8 -> 29 at 64^3), `out` the output one (29 -> 1 at
64^3). Ours and oneDNN's run alternately, round after round, in one process; each keeps its
fastest round. Checked first, against float64 on the same values (the largest error relative
to the largest entry): a wrong result would be off by order 1. In bfloat16 oneDNN rounds its
results to bfloat16; our weight gradient keeps float32, our Winograd outputs carry about three
times a direct convolution's rounding (ops/conv3d_winograd.py).

nn/conv.py uses ours where this table shows it faster. Needs a CPU with AVX512-BF16 for
bfloat16 and AVX-512 for float32 (the kernels' instructions); elsewhere it says so and stops.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"64": (29, 29, 64), "32": (87, 87, 32), "16": (116, 116, 16), "8": (116, 116, 8), "128": (29, 29, 128),
          "64w": (87, 87, 64), "32w": (116, 116, 32), "in": (8, 29, 64),
          "out": (29, 1, 64)}  # name -> (in, out channels, edge)
PASSES = ("forward", "input", "weight")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_GEOMETRY = ([1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)  # stride, padding, dilation, ..., groups
# Largest admissible error relative to the largest entry: oneDNN's bfloat16 rounding is about
# 2^-9, Winograd's up to a few times that; our float32 weight gradient about 1e-6, float32
# results about 1e-6 too.
LIMITS = {(torch.bfloat16, "forward"): 2 ** -5, (torch.bfloat16, "input"): 2 ** -5,
          (torch.bfloat16, "weight"): 2 ** -7, (torch.float32, "forward"): 1e-4, (torch.float32, "input"): 1e-4}


def inputs(name: str, dtype: torch.dtype = torch.bfloat16):
    c_in, c_out, edge = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last_3d
    x = torch.randn(1, c_in, edge, edge, edge, generator=g).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(1, c_out, edge, edge, edge, generator=g).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5).to(dtype)
    return x, grad, weight.contiguous(memory_format=layout)


def onednn(which: str, x, grad, weight):
    if which == "forward":
        return torch.ops.aten.convolution(x, weight, None, *_GEOMETRY)
    mask = [which == "input", which == "weight", False]
    return torch.ops.aten.convolution_backward(grad, x, weight, None, *_GEOMETRY, mask)[0 if which == "input" else 1]


def ours(which: str, x, grad, weight):
    from patchddm_fast.ops import conv3d_weight_grad, conv3d_winograd, conv3d_winograd_input_grad

    if which == "forward":
        return conv3d_winograd(x, weight)
    if which == "input":
        return conv3d_winograd_input_grad(grad, weight)
    return conv3d_weight_grad(x, grad)[0]


def exact(which: str, x, grad, weight) -> torch.Tensor:
    x64, grad64, weight64 = x.double(), grad.double(), weight.double()
    if which == "forward":
        return torch.ops.aten.convolution(x64, weight64, None, *_GEOMETRY)
    return onednn(which, x64, grad64, weight64)  # aten's float64 path, not oneDNN's


def measure(which: str, name: str, rounds: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    args = inputs(name, dtype)
    reference = exact(which, *args)
    errors = {label: float((fn(which, *args).double() - reference).abs().max() / reference.abs().max())
              for label, fn in (("ours", ours), ("oneDNN", onednn))}
    if max(errors.values()) > LIMITS[dtype, which]:
        raise RuntimeError(f"{which} {name} {dtype}: wrong result, relative errors {errors}")
    best = {"ours": float("inf"), "oneDNN": float("inf")}
    for _ in range(rounds):
        for label, fn in (("ours", ours), ("oneDNN", onednn)):
            start = time.perf_counter()
            fn(which, *args)
            best[label] = min(best[label], time.perf_counter() - start)
    return {"best": best, "errors": errors}


def main(argv=None) -> list:
    from patchddm_fast.ops.conv3d_weight_grad import kernel_available as weight_grad_available
    from patchddm_fast.ops.conv3d_winograd import kernel_available as winograd_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="2", help="torch thread counts, comma-separated (default 2)")
    parser.add_argument("--levels", default="64,32,16,8,in,out", help=f"among {','.join(SHAPES)}")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"among {','.join(PASSES)}")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="bfloat16, float32 or both")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    passes, dtypes = args.passes.split(","), args.dtypes.split(",")
    if unknown := sorted(set(passes) - set(PASSES)):
        raise SystemExit(f"conv_kernels: unknown passes {unknown}; choose among {', '.join(PASSES)}")
    if unknown := sorted(set(dtypes) - set(DTYPES)):
        raise SystemExit(f"conv_kernels: unknown dtypes {unknown}; choose among {', '.join(DTYPES)}")
    for name in dtypes:
        runs = winograd_available(DTYPES[name]) and (name == "float32" or weight_grad_available())
        if not runs:
            needs = "AVX512-BF16" if name == "bfloat16" else "AVX-512"
            raise SystemExit(f"conv_kernels: the {name} kernels cannot run here (no {needs}, or the extension "
                             "is not built)")
    print("| threads | dtype | pass | shape | ours ms | oneDNN ms | speed-up | error ours | error oneDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    before, results = torch.get_num_threads(), []
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name in args.levels.split(","):
                c_in, c_out, edge = SHAPES[name]
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    for which in passes:
                        if (dtype, which) not in LIMITS:
                            continue  # no float32 weight-gradient kernel of ours
                        r = dict(measure(which, name, args.rounds, dtype), threads=threads, level=name,
                                 which=which, dtype=dtype_name)
                        ms = {k: v * 1e3 for k, v in r["best"].items()}
                        print(f"| {threads} | {dtype_name} | {which} | {c_in}->{c_out} ch {edge}^3 | {ms['ours']:.2f} | "
                              f"{ms['oneDNN']:.2f} | {ms['oneDNN'] / ms['ours']:.2f}x | {r['errors']['ours']:.1e} | "
                              f"{r['errors']['oneDNN']:.1e} |", flush=True)
                        results.append(r)
    finally:
        torch.set_num_threads(before)
    return results


if __name__ == "__main__":
    main()
