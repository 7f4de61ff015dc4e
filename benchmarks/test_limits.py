"""The hardware limit: every figure next to the device's own ceilings, measured in this run.

- peaks: one large matrix product (TFLOP/s, per precision) and one large copy (GB/s, bytes
  read plus written), group "limits peaks <device>";
- the U-Net (ours and the baseline, forward and training step): seconds, FLOPs counted from
  its Conv3d and Linear modules (benchmarks/limits.py), achieved TFLOP/s and the fraction of
  the matrix-product peak of its precision (GPU float32: TF32, which cuDNN uses by default);
- every fused op at one large shape, each backend this device runs: seconds, the least bytes
  it must move, achieved GB/s and the fraction of the copy peak.

Sizes: CPU: the small U-Net at 32^3 and ops on 29 x 64^3 channels; paper scale (GPU default,
or --paper-scale): the paper's U-Net, forward at 256^3 and training at 128^3, ops on the
paper's level-0 activation 29 x 256^3 (29 x 64^3 on a CPU). Each case checks its result
against the plain-PyTorch reference first and records its peak memory (GPU:
max_memory_allocated; CPU: peak RSS growth in a fresh process).

At the end it writes limits-<device>.md / .json to --bench-out (default .benchmarks/): the
ceilings, the paper U-Net's FLOPs per forward (256^3) and per training step (128^3), the least
bytes of the fused ops per step, and the achieved fractions.

    pytest benchmarks/test_limits.py --benchmark-only [--paper-scale]
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import limits
from benchmarks.workloads import assert_matches, measure, timed

_ACHIEVED: list[dict] = []


# -- workloads of the fused ops ---------------------------------------------------------------

OPS = ("group_norm_silu", "group_norm_silu+add+skip", "group_norm_silu+add+skip fwd+bwd", "avg_skip",
       "ddim_step", "q_sample", "assemble_input")
_OP_REGISTRY = {"group_norm_silu": "group_norm_silu", "avg_skip": "avg_skip", "ddim_step": "noise_update",
                "q_sample": "noise_update", "assemble_input": "assemble_input"}


def op_shape(paper: bool, device: str) -> tuple:
    """(batch, channels, D, H, W) of the activation-sized ops; x_t ops use 5 members x 1 channel."""
    size = 256 if (paper and device == "cuda") else 64
    return (1, 29, size, size, size)


def setup_op(op: str, backend: str, dtype: str = "float32", paper: bool = False, device: str = "cpu"):
    """A workload: one call of a fused op by one backend. run() returns what to compare."""
    import patchddm_fast.ops as ops

    torch_dtype = getattr(torch, dtype)
    shape = op_shape(paper, device)
    generator = torch.Generator().manual_seed(6)

    def randn(*size, dtype=torch_dtype):
        return torch.randn(size, generator=generator).to(device=device, dtype=dtype)

    name = op.split("+")[0].split(" ")[0]
    if name == "group_norm_silu":
        x, weight, bias = randn(*shape), randn(shape[1]), randn(shape[1])
        extra = {}
        if "+add" in op:
            extra = dict(add=randn(shape[0], shape[1]), skip=randn(*shape))
        if "bwd" in op:
            for t in (x, weight, bias, *extra.values()):
                t.requires_grad_(True)
            grad = randn(*shape)

            def run():
                average, y = ops.group_norm_silu(x, weight, bias, 29, add=extra["add"], skip=extra["skip"],
                                                 backend=backend)
                torch.autograd.backward([y], [grad])
                result = (y.detach(), x.grad.clone())
                for t in (x, weight, bias, *extra.values()):
                    t.grad = None
                return result

            return run
        return lambda: ops.group_norm_silu(x, weight, bias, 29, backend=backend, **extra)
    if name == "avg_skip":
        h, skip = randn(*shape), randn(*shape)
        return lambda: ops.avg_skip(h, skip, backend=backend)
    members_shape = (5, 1) + shape[2:]
    if name == "ddim_step":
        x_t, eps = randn(*members_shape, dtype=torch.float32), randn(*members_shape, dtype=torch.float32)
        out, x0 = torch.empty_like(x_t), torch.empty_like(x_t)
        return lambda: ops.ddim_step(x_t, eps, 0.5, 0.7, clip=True, out=out, x0_out=x0, backend=backend)
    if name == "q_sample":
        mask = (randn(*members_shape, dtype=torch.float32) > 1).float()
        out = torch.empty_like(mask)
        return lambda: ops.q_sample(mask, 0.3, seed=7, return_noise=False, out=out, backend=backend)
    if name == "assemble_input":
        volume, x_t = randn(1, 4, *shape[2:], dtype=torch.float32), randn(*members_shape, dtype=torch.float32)
        out = torch.empty((5, 8) + shape[2:], device=device)
        return lambda: ops.assemble_input(volume, [[0, 0, 0]] * 5, x_t, out=out, backend=backend)
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def op_bytes(op: str, dtype: str, paper: bool, device: str) -> int:
    shape = op_shape(paper, device)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    members_shape = (5, 1) + shape[2:]
    if op.startswith("group_norm_silu"):
        skip = "+skip" in op
        moved = limits.group_norm_silu_bytes(shape, itemsize, add=skip, skip=skip, groups=29)
        if "bwd" in op:
            moved += limits.group_norm_silu_bytes(shape, itemsize, add=skip, skip=skip, groups=29, backward=True)
        return moved
    if op == "avg_skip":
        return limits.avg_skip_bytes(shape, itemsize)
    if op == "ddim_step":
        return limits.ddim_step_bytes(members_shape, 4)
    if op == "q_sample":
        return limits.q_sample_bytes(members_shape, 4)
    return limits.assemble_input_bytes(5, 4, shape[2:])


def _op_cases():
    cases = []
    for op in OPS:
        for dtype in ("float32", "bfloat16"):
            if dtype == "bfloat16" and not (op.startswith("group_norm_silu") or op == "avg_skip"):
                continue  # the noise and input ops work on float32 x_t and buffers
            for backend in ("cpp", "cuda", "triton"):
                cases.append(pytest.param(op, dtype, backend, id=f"{op}-{dtype}-{backend}"))
    return cases


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["matmul-float32", "matmul-tf32", "matmul-bfloat16", "copy"])
def test_peak(benchmark, bench_device, device_peaks, what):
    device = bench_device
    if device.type != "cuda" and what in ("matmul-tf32", "matmul-bfloat16"):
        pytest.skip("TF32 and the bf16 matrix units are GPU ceilings")
    benchmark.group = f"limits peaks {device.type}"
    if what == "copy":
        nbytes = 2 * limits.GIB if device.type == "cuda" else 256 * 2**20
        source = torch.randn(nbytes // 4, device=device)
        target = torch.empty_like(source)
        benchmark.pedantic(timed(lambda: target.copy_(source), device), rounds=10, warmup_rounds=3)
        assert torch.equal(target, source)
        benchmark.extra_info.update(name=what, GBps=round(2 * nbytes / benchmark.stats.stats.median / 1e9, 1),
                                    fixture_GBps=round(device_peaks["copy_gbps"], 1))
        return
    precision = what.split("-")[1]
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        reference = a[:64].double() @ b.double()
        assert_matches(torch.mm(a[:64], b), reference, "bfloat16" if precision != "float32" else "float32",
                       what=f"matmul {precision}")
        out = torch.empty(n, n, device=device, dtype=dtype)
        benchmark.pedantic(timed(lambda: torch.mm(a, b, out=out), device), rounds=10, warmup_rounds=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    benchmark.extra_info.update(name=what, TFLOPs=round(2 * n**3 / benchmark.stats.stats.median / 1e12, 3),
                                fixture_TFLOPs=round(device_peaks[f"matmul_tflops_{precision}"], 3))


def _unet_cases():
    cases = []
    for train in (False, True):
        for variant in ("baseline", "ours"):
            for precision in ("float32", "bfloat16"):
                cases.append(pytest.param(variant, precision, train,
                                          id=f"{'train' if train else 'forward'}-{variant}-{precision}"))
    return cases


def unet_size(paper: bool, device: str, train: bool) -> tuple[str, int]:
    if not paper:
        return "small", 32
    if device != "cuda":
        return "paper", 64
    return "paper", 128 if train else 256


@pytest.mark.parametrize("variant,precision,train", _unet_cases())
def test_unet_flops(benchmark, bench_device, paper_scale, device_peaks, variant, precision, train):
    from benchmarks import workloads

    device = bench_device.type
    if precision == "bfloat16" and device != "cuda":
        pytest.skip("bf16 autocast is timed on a GPU (CPU bf16 convolutions are not what anyone runs)")
    preset, size = unet_size(paper_scale, device, train)
    kwargs = dict(variant=variant, preset=preset, size=size, precision=precision, train=train, device=device)
    run = workloads.unet_pass(**kwargs)

    def check():
        reference = workloads.unet_pass(**dict(kwargs, variant="baseline", precision="float32"))()
        assert_matches(run(), reference, precision, what=f"U-Net {variant} {precision}")

    mode = "train" if train else "forward"
    entry = measure(benchmark, run, device=device, group=f"limits unet {mode} {preset} {size}^3 {device}",
                    name=f"{variant}-{precision}", baseline="baseline-float32", target="benchmarks.workloads:unet_pass",
                    kwargs=kwargs, rounds=3 if device == "cuda" else 2, warmup_rounds=0, check=check)
    flops = limits.unet_flops(preset, (size,) * 3)["train_step" if train else "forward"]
    peak = limits.matmul_peak_for(device_peaks, precision, device)
    achieved = flops / entry["seconds"] / 1e12
    benchmark.extra_info.update(flops=flops, TFLOPs=round(achieved, 4), peak_TFLOPs=round(peak, 3),
                                fraction_of_peak=round(achieved / peak, 4))
    _ACHIEVED.append(dict(kind="unet", what=f"U-Net {preset} {mode} {size}^3 {variant} {precision}",
                          seconds=entry["seconds"], work=flops, rate=achieved, unit="TFLOP/s", peak=peak))


@pytest.mark.parametrize("op,dtype,backend", _op_cases())
def test_op_bandwidth(benchmark, bench_device, paper_scale, device_peaks, op, dtype, backend):
    from patchddm_fast.ops import FastOp

    device = bench_device.type
    registry = FastOp.registry[_OP_REGISTRY[op.split("+")[0].split(" ")[0]]]
    if backend not in {"cpu": ("cpp",), "cuda": ("cuda", "triton")}[device]:
        pytest.skip(f"{backend} does not run on {device} tensors here (the Triton interpreter is not timed)")
    if dtype == "bfloat16" and device == "cpu":
        pytest.skip("bf16 ops are timed on a GPU")
    why = registry.why_unavailable(backend, device)
    if why is not None:
        pytest.skip(f"no {backend} kernel of {registry.name} in this build: {why}")
    kwargs = dict(op=op, backend=backend, dtype=dtype, paper=paper_scale, device=device)
    run = setup_op(**kwargs)

    def check():
        expected = setup_op(**dict(kwargs, backend="torch"))()
        assert_matches(run(), expected, "float32" if dtype == "float32" else "bfloat16", what=f"{op} {backend}")

    entry = measure(benchmark, run, device=device, group=f"limits op {op} {dtype} {device}", name=backend,
                    target="benchmarks.test_limits:setup_op", kwargs=kwargs, rounds=20 if device == "cuda" else 5,
                    warmup_rounds=1, check=check)
    moved = op_bytes(op, dtype, paper_scale, device)
    achieved = moved / entry["seconds"] / 1e9
    benchmark.extra_info.update(moved_bytes=moved, GBps=round(achieved, 2), peak_GBps=round(device_peaks["copy_gbps"], 1),
                                fraction_of_peak=round(achieved / device_peaks["copy_gbps"], 4))
    _ACHIEVED.append(dict(kind="op", what=f"{op} {dtype} {backend}", seconds=entry["seconds"], work=moved,
                          rate=achieved, unit="GB/s", peak=device_peaks["copy_gbps"]))


# -- the report --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def limits_report(bench_out, bench_device, device_peaks, report_lines):
    yield
    paper_forward = limits.unet_flops("paper", (256,) * 3)
    paper_train = limits.unet_flops("paper", (128,) * 3)
    traffic = {"sampling step 256^3 float32": limits.fused_op_traffic("paper", (256,) * 3),
               "sampling step 256^3 bfloat16": limits.fused_op_traffic("paper", (256,) * 3, precision="bfloat16"),
               "training step 128^3 bfloat16": limits.fused_op_traffic("paper", (128,) * 3, train=True,
                                                                       precision="bfloat16")}
    lines = [f"## Limits on {device_peaks['device_name']} ({bench_device.type})", "",
             "Ceilings measured in this run: " + ", ".join(
                 f"{k.replace('_', ' ')} {v:.2f}" for k, v in device_peaks.items() if isinstance(v, float)), "",
             "Paper U-Net (counted from its Conv3d/Linear modules): "
             f"forward at 256^3 {paper_forward['forward'] / 1e12:.2f} TFLOP; training step at 128^3 "
             f"{paper_train['train_step'] / 1e12:.2f} TFLOP (forward {paper_train['forward'] / 1e12:.2f}).", "",
             "| step | fused op | calls | least bytes (GB) | floor at copy peak (ms) |", "|---|---|---|---|---|"]
    for step, ops in traffic.items():
        for op, row in ops.items():
            lines.append(f"| {step} | {op} | {row['calls']} | {row['bytes'] / 1e9:.2f} | "
                         f"{row['bytes'] / (device_peaks['copy_gbps'] * 1e9) * 1e3:.1f} |")
    lines += ["", "| measured | seconds | work | achieved | ceiling | fraction |", "|---|---|---|---|---|---|"]
    for row in _ACHIEVED:
        work = f"{row['work'] / 1e12:.3f} TFLOP" if row["kind"] == "unet" else f"{row['work'] / 1e9:.3f} GB"
        lines.append(f"| {row['what']} | {row['seconds']:.4g} | {work} | {row['rate']:.3g} {row['unit']} | "
                     f"{row['peak']:.3g} {row['unit']} | {row['rate'] / row['peak']:.1%} |")
    text = "\n".join(lines)
    stem = os.path.join(bench_out, f"limits-{bench_device.type}")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(dict(peaks=device_peaks, paper_forward_256=paper_forward, paper_train_128=paper_train,
                       traffic=traffic, achieved=_ACHIEVED), f, indent=1, default=str)
    report_lines.append("")
    report_lines.extend(text.splitlines())
