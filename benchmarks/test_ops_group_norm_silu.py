"""GroupNorm + SiLU: our fused kernels against the eager sequence they replace, side by side.

`eager` is what PatchDDM's ResBlock does: [(h + skip) / 2,] [h + emb[..., None, None, None],]
F.group_norm, F.silu; `compile` is torch.compile of that same function. Ours: `cpp` on CPU
tensors, `cuda` and `triton` on CUDA tensors (the Triton interpreter is not timed).

Cases: `plain` (group_norm then silu), `add` (the timestep bias added first, as the second
norm of a ResBlock), `skip` (the decoder's averaging skip first; the average is returned too).
Modes: `forward` (under no_grad) and `train` (forward, then backward of y with a fixed
upstream gradient, gradients for every input and parameter).
Sizes: CPU (1, 32, 32^3) float32 with 8 groups, at 1 and 2 threads; paper (GPU or
--paper-scale) (1, 116, 128^3) with 29 groups and (1, 29, 256^3) with 29 groups.

Every case first checks its result against the reference, then records in extra_info its
peak memory (CPU: peak RSS growth of one run in a fresh process, at one thread; GPU:
max_memory_allocated), in train mode the bytes its forward saves for the backward, and its
speedups over `eager` and `compile` from the fastest rounds
(which other jobs on a shared machine disturb least), when those ran earlier in the session.

    pytest benchmarks/test_ops_group_norm_silu.py --benchmark-only
    pytest benchmarks/test_ops_group_norm_silu.py --benchmark-only --paper-scale
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.workloads import check_then_time

EPS = 1e-5
SIZES = {  # name -> (shape, groups)
    "small": [("32^3x32", (1, 32, 32, 32, 32), 8)],
    "paper": [("128^3x116", (1, 116, 128, 128, 128), 29), ("256^3x29", (1, 29, 256, 256, 256), 29)],
}
CASES = ("plain", "add", "skip")
MODES = ("forward", "train")
OURS = ("cpp", "cuda", "triton")
IMPLS = ("eager", "compile") + OURS
DEVICE_IMPLS = {"cpu": ("eager", "compile", "cpp"), "cuda": ("eager", "compile", "cuda", "triton")}
CPU_THREADS = (1, 2)


def eager_norm_act(x, weight, bias, groups, add, skip):
    """The original's sequence; returns y (and the average with a skip, as the ResBlock keeps it)."""
    average = None
    if skip is not None:
        x = average = (x + skip) / 2
    if add is not None:
        x = x + add[..., None, None, None]
    y = F.silu(F.group_norm(x, groups, weight, bias, EPS))
    return y if average is None else (average, y)


def _sizes(paper: bool):
    return SIZES["paper" if paper else "small"]


@functools.lru_cache(maxsize=1)  # every implementation of a case reads the same inputs
def make_inputs(case: str, size: str, paper: bool, device: str):
    shape, groups = next((s, g) for name, s, g in _sizes(paper) if name == size)
    generator = torch.Generator().manual_seed(0)
    B, C = shape[:2]
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device)
    skip = torch.randn(shape, generator=generator).to(device) if case == "skip" else None
    add = torch.randn(B, C, generator=generator).to(device) if case == "add" else None
    weight = (torch.rand(C, generator=generator) + 0.5).to(device)
    bias = torch.randn(C, generator=generator).to(device)
    grad_out = torch.randn(shape, generator=generator).to(device)
    return dict(x=x, skip=skip, add=add, weight=weight, bias=bias), groups, grad_out


def _function(impl: str):
    from patchddm_fast.ops import group_norm_silu

    if impl == "eager":
        return eager_norm_act
    if impl == "compile":
        # Every case, mode and thread count compiles the same function anew: without a reset
        # they pile up on one code object until Dynamo's recompile limit stops them.
        torch._dynamo.reset()
        return torch.compile(eager_norm_act, fullgraph=True)

    def ours(x, weight, bias, groups, add, skip):
        return group_norm_silu(x, weight, bias, groups, EPS, add=add, skip=skip, backend=impl)

    return ours


def setup_run(case: str, impl: str, mode: str, size: str, paper: bool = False, device: str = "cpu",
              threads: int | None = None):
    """A workload for benchmarks.memory: one forward (or forward + backward) of a case."""
    if threads is not None:
        torch.set_num_threads(threads)
    inputs, groups, grad_out = make_inputs(case, size, paper, device)
    f = _function(impl)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return f(inputs["x"], inputs["weight"], inputs["bias"], groups, inputs["add"], inputs["skip"])
        return run
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}

    def run():
        out = f(args["x"], args["weight"], args["bias"], groups, args["add"], args["skip"])
        y = out[1] if isinstance(out, tuple) else out
        return torch.autograd.grad(y, list(leaves.values()), grad_out)

    return run


def check_against_reference(run, case, mode, size, paper, device):
    """The implementation's result against the reference op's (float32 tolerances relative to
    the largest value: gradients of the parameters are sums over a whole volume)."""
    result = run()
    expected = reference_result(case, mode, size, paper, device)
    for a, e in zip(result if isinstance(result, tuple) else (result,),
                    expected if isinstance(expected, tuple) else (expected,)):
        scale = max(1.0, float(e.abs().max()))
        # A benchmark's sanity check, not the oracle test (tests/ops has those): float32 statistics
        # over up to 2^21 elements in another order, 10x the unit tests' 1e-5.
        torch.testing.assert_close(a, e, atol=1e-4 * scale, rtol=1e-4)


def reference_result(case, mode, size, paper, device):
    from patchddm_fast.ops import group_norm_silu_reference

    inputs, groups, grad_out = make_inputs(case, size, paper, device)
    if mode == "forward":
        return group_norm_silu_reference(inputs["x"], inputs["weight"], inputs["bias"], groups, EPS,
                                         add=inputs["add"], skip=inputs["skip"])
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    out = group_norm_silu_reference(args["x"], args["weight"], args["bias"], groups, EPS, add=args["add"],
                                    skip=args["skip"])
    y = out[1] if isinstance(out, tuple) else out
    return torch.autograd.grad(y, list(leaves.values()), grad_out)


def saved_bytes(case, impl, size, paper, device) -> int:
    """Bytes that a forward keeps for its backward, beyond the inputs themselves: what a
    U-Net holds per norm between its forward and backward passes. (Not for `compile`, whose
    saved tensors are internal to its compiled graph.)"""
    inputs, groups, _ = make_inputs(case, size, paper, device)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _function(impl)(args["x"], args["weight"], args["bias"], groups, args["add"], args["skip"])
    del out
    held = {v.untyped_storage().data_ptr() for v in leaves.values()}
    return sum(n for ptr, n in storages.items() if ptr not in held)


_SECONDS: dict[tuple, float] = {}
_PEAKS: dict[tuple, int] = {}


def _thread_params():
    return [None] if torch.cuda.is_available() else list(CPU_THREADS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", _thread_params(), ids=lambda t: f"threads{t}" if t else "gpu")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", sorted({name for sizes in SIZES.values() for name, _, _ in sizes}))
def test_group_norm_silu(benchmark, bench_device, paper_scale, size, case, mode, threads, impl):
    from patchddm_fast.ops import FastOp

    device = bench_device.type
    if size not in [name for name, _, _ in _sizes(paper_scale)]:
        pytest.skip(f"size {size} is not benchmarked at this scale")
    if impl not in DEVICE_IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device} tensors here (the Triton interpreter is not timed)")
    op = FastOp.registry["group_norm_silu"]
    if impl in OURS and impl not in op.available(device):
        pytest.fail(f"backend {impl} unavailable: {op.why_unavailable(impl, device)}")
    saved_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        run = setup_run(case, impl, mode, size, paper_scale, device)
        memory_key = (size, case, mode, impl, paper_scale, device)
        peak = check_then_time(
            benchmark, run, device=device,
            check=lambda: check_against_reference(run, case, mode, size, paper_scale, device),  # warms compile up
            group=(f"group_norm_silu {size} {case} {mode} "
                   f"{'paper' if paper_scale else 'small'} {device}{f' threads={threads}' if threads else ''}"),
            # the same at any thread count: measured once, with one thread
            target="benchmarks.test_ops_group_norm_silu:setup_run",
            kwargs=dict(case=case, impl=impl, mode=mode, size=size, paper=paper_scale, threads=1),
            peak=_PEAKS.get(memory_key), rounds=10 if paper_scale else 30, warmup_rounds=2)
        if device == "cpu":
            _PEAKS[memory_key] = peak
    finally:
        torch.set_num_threads(saved_threads)
    seconds = benchmark.stats.stats.min
    key = (size, case, mode, threads, paper_scale, device)
    _SECONDS[key + (impl,)] = seconds
    info = benchmark.extra_info
    info.update(peak_bytes=peak, threads=threads)
    if mode == "train" and impl != "compile":
        info["saved_for_backward_bytes"] = saved_bytes(case, impl, size, paper_scale, device)
    for baseline in ("eager", "compile"):
        other = _SECONDS.get(key + (baseline,))
        if other is not None and impl not in ("eager", baseline):
            info[f"speedup_vs_{baseline}"] = round(other / seconds, 2)
