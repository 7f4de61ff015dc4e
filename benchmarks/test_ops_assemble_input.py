"""Model-input assembly: our kernels against the original's data path, side by side.

The original builds each patch's input from a crop of the volume, coordinates made with
linspace + meshgrid, and torch.cat (then stacks the batch): `eager` below; `compile` is
torch.compile of that same function; `copy` is a plain copy between two preallocated tensors
of the output's size: the copy bandwidth that a memory-bound kernel can at best reach. Ours:
`cpp` on CPU tensors, `cuda` and `triton` on CUDA tensors (the Triton interpreter is not
timed), each allocating its output like eager does, and `<backend>-out` writing into a
preallocated buffer as the sampler does (on the CPU, first-touch page faults of a fresh
output can cost more than the assembly itself).

Cases: `patches` = 4 patches of a shared 4-channel volume at random offsets plus a 1-channel
x_t (training input), `full` = the whole volume for 5 ensemble members (sampling input).
Sizes: CPU 64^3 volume / 32^3 patches and 96^3 full; paper (GPU or --paper-scale) 256^3 /
128^3 and 256^3 full.

Every case first checks its result against the reference, then records in extra_info its
peak memory (CPU: peak RSS growth of one run in a fresh process; GPU: max_memory_allocated),
the bytes it moves, its bandwidth, its speedups over `eager` and `compile` and, for ours,
the fraction of `copy` bandwidth it reaches (from the fastest rounds, which other jobs on a
shared machine disturb least), when those ran earlier in the session.

    pytest benchmarks/test_ops_assemble_input.py --benchmark-only
    pytest benchmarks/test_ops_assemble_input.py --benchmark-only --paper-scale
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.workloads import check_then_time

CHANNELS, X_T_CHANNELS = 4, 1
SIZES = {  # case -> (small, paper): (volume size, patch size, patches)
    "patches": ((64, 32, 4), (256, 128, 4)),
    "full": ((96, 96, 5), (256, 256, 5)),
}
OURS = ("cpp", "cpp-out", "cuda", "cuda-out", "triton", "triton-out")
IMPLS = ("eager", "compile", "copy") + OURS
DEVICE_IMPLS = {"cpu": ("eager", "compile", "copy", "cpp", "cpp-out"),
                "cuda": ("eager", "compile", "copy", "cuda", "cuda-out", "triton", "triton-out")}


def eager_assemble(volume, offsets, x_t, patch, coord_shape):
    """The original's data path: per patch, crop + linspace/meshgrid coordinates + torch.cat."""
    axes = [torch.linspace(-1, 1, n, dtype=volume.dtype, device=volume.device) for n in coord_shape]
    inputs = []
    for b, (o0, o1, o2) in enumerate(offsets):
        window = (slice(o0, o0 + patch[0]), slice(o1, o1 + patch[1]), slice(o2, o2 + patch[2]))
        image = volume[b if volume.shape[0] > 1 else 0][(slice(None),) + window]
        coords = torch.stack(torch.meshgrid(*(axis[w] for axis, w in zip(axes, window)), indexing="ij"))
        inputs.append(torch.cat([image, coords, x_t[b]]))
    return torch.stack(inputs)


@functools.lru_cache(maxsize=1)  # every implementation of a case reads the same (unmodified) inputs
def make_inputs(case: str, paper: bool, device: str):
    size, patch_size, batch = SIZES[case][1 if paper else 0]
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(1, CHANNELS, size, size, size, generator=generator).to(device)
    if case == "full":
        offsets = [(0, 0, 0)] * batch
    else:
        offsets = [tuple(int(v) for v in torch.randint(0, size - patch_size + 1, (3,), generator=generator))
                   for _ in range(batch)]
    patch = (patch_size,) * 3
    x_t = torch.randn((batch, X_T_CHANNELS) + patch, generator=generator).to(device)
    return volume, offsets, x_t, patch


def setup_run(case: str, impl: str, paper: bool = False, device: str = "cpu"):
    """A workload for benchmarks.memory: one assembly of a case by one implementation."""
    from patchddm_fast.ops import assemble_input

    volume, offsets, x_t, patch = make_inputs(case, paper, device)
    coord_shape = tuple(volume.shape[2:])
    if impl == "eager":
        return lambda: eager_assemble(volume, offsets, x_t, patch, coord_shape)
    if impl == "compile":
        compiled = torch.compile(eager_assemble, fullgraph=True)
        return lambda: compiled(volume, offsets, x_t, patch, coord_shape)
    if impl == "copy":
        source = torch.empty((len(offsets), CHANNELS + 3 + X_T_CHANNELS) + patch, device=device)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)
    backend, _, variant = impl.partition("-")
    if variant == "out":  # into a preallocated buffer, as the sampler does
        out = torch.empty((len(offsets), CHANNELS + 3 + X_T_CHANNELS) + patch, device=device)
        return lambda: assemble_input(volume, offsets, x_t, patch, out=out, backend=backend)
    return lambda: assemble_input(volume, offsets, x_t, patch, backend=backend)


def moved_bytes(case: str, impl: str, paper: bool) -> int:
    """Bytes read plus written by a single pass (the least any implementation must move)."""
    _, patch_size, batch = SIZES[case][1 if paper else 0]
    voxels = batch * patch_size**3 * 4  # float32
    if impl == "copy":
        return 2 * voxels * (CHANNELS + 3 + X_T_CHANNELS)
    return voxels * (CHANNELS + X_T_CHANNELS) + voxels * (CHANNELS + 3 + X_T_CHANNELS)


_SECONDS: dict[tuple, float] = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(SIZES))
def test_assemble_input(benchmark, bench_device, paper_scale, case, impl):
    from patchddm_fast.ops import FastOp, assemble_input_reference

    device = bench_device.type
    if impl not in DEVICE_IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device} tensors here (the Triton interpreter is not timed)")
    backend = impl.partition("-")[0]
    op = FastOp.registry["assemble_input"]
    if impl in OURS and backend not in op.available(device):
        pytest.fail(f"backend {backend} unavailable: {op.why_unavailable(backend, device)}")
    run = setup_run(case, impl, paper_scale, device)

    def check():
        if impl == "copy":
            return
        volume, offsets, x_t, patch = make_inputs(case, paper_scale, device)
        expected = assemble_input_reference(volume, offsets, x_t, patch, volume.shape[2:])
        torch.testing.assert_close(run(), expected, atol=2**-23, rtol=0)  # linspace: to float32 rounding

    peak = check_then_time(benchmark, run, device=device, check=check,
                           group=f"assemble_input {case} {'paper' if paper_scale else 'small'} {device}",
                           target="benchmarks.test_ops_assemble_input:setup_run",
                           kwargs=dict(case=case, impl=impl, paper=paper_scale),
                           rounds=10 if paper_scale else 20, warmup_rounds=2)
    seconds = benchmark.stats.stats.min  # robust to other jobs on a shared machine
    _SECONDS[(case, impl, paper_scale, device)] = seconds
    moved = moved_bytes(case, impl, paper_scale)
    info = benchmark.extra_info
    info.update(peak_bytes=peak, moved_bytes=moved, bandwidth_GBps=round(moved / seconds / 1e9, 2))
    eager = _SECONDS.get((case, "eager", paper_scale, device))
    if eager is not None and impl != "eager":
        info["speedup_vs_eager"] = round(eager / seconds, 2)
    compiled = _SECONDS.get((case, "compile", paper_scale, device))
    if compiled is not None and impl not in ("eager", "compile"):
        info["speedup_vs_compile"] = round(compiled / seconds, 2)
    copy = _SECONDS.get((case, "copy", paper_scale, device))
    if copy is not None and impl in OURS:
        copy_bandwidth = moved_bytes(case, "copy", paper_scale) / copy
        info["fraction_of_copy_bandwidth"] = round(moved / seconds / copy_bandwidth, 3)
