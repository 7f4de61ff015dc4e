"""Peak memory of a piece of work, measured the same way for every benchmark.

GPU: torch.cuda.max_memory_allocated over the work, minus what was allocated before it.
CPU: the work runs in a fresh Python process; its peak resident set size (VmHWM) over the
work minus its resident size just before (after imports, inputs and one warm-up run): the
allocator state of the benchmark process cannot inflate or hide anything, and glibc's mmap
threshold is pinned so that freed tensors leave the resident set (see cpu_peak_bytes).

Live tensors (any device, also shapes only): `tensor_peak_bytes` counts the bytes of the
tensors alive while a run executes (the tracker of patchddm_fast.diffusion.memory, keyed by
storage so that it also counts fake tensors), plus what the workload holds between runs
(`held_bytes`). `unet_pass_bytes` runs the U-Net on fake tensors (FakeTensorMode: shapes only,
nothing computed), so the paper's network is measured at 256^3 on a laptop. Neither sees
allocator caching and fragmentation or workspaces that libraries allocate inside an op.

A workload is a function `setup(**kwargs) -> run` in an importable module: setup builds the
inputs (not counted), run() does the work (counted).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _load(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def held_tensors(objects) -> list[torch.Tensor]:
    """The tensors in tensors, modules (parameters, gradients, buffers), optimizers (their
    state), and dicts / lists / tuples of those; one per storage."""
    seen: dict[int, torch.Tensor] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen.setdefault(t.untyped_storage()._cdata, t)
            if t.grad is not None:
                add(t.grad)

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                visit(state)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(objects)
    return list(seen.values())


def held_bytes(objects) -> int:
    """Bytes of the distinct storages held by `objects` (see held_tensors)."""
    return sum(t.untyped_storage().nbytes() for t in held_tensors(objects))


def storage_tracker(external=()):
    """A live-tensor tracker that also counts fake tensors (a TorchDispatchMode: `with
    tracker: ...`, then tracker.peak)."""
    # Imported here: patchddm_fast.diffusion pulls in tqdm, which a bare GPU machine may lack.
    from patchddm_fast.diffusion.memory import LiveTensorBytes

    return LiveTensorBytes(external, fake_tensors=True)


def tensor_peak_bytes(run) -> dict:
    """Live-tensor bytes of one call of run (after a warm-up call that creates lazy state such
    as optimizer moments): transient = peak of the tensors created during the call; held = what
    run.held keeps between calls; total = both, what a device must hold for the work."""
    run()
    held = held_tensors(getattr(run, "held", []))
    with storage_tracker(external=held) as tracker:
        result = run()
    del result
    held_total = sum(t.untyped_storage().nbytes() for t in held)
    return dict(transient=tracker.peak, held=held_total, total=tracker.peak + held_total)


def unet_pass_bytes(preset="paper", shape=(256, 256, 256), batch: int = 1, variant: str = "ours",
                    precision: str = "float32", train: bool = False) -> dict:
    """Live-tensor bytes of one U-Net pass counted on fake tensors (shapes only, no arithmetic):
    transient = the peak of the tensors the pass creates (no-grad forward, or forward +
    backward with train=True), weights = its parameters. The input is not counted.
    preset: a name of patchddm_fast.nn.PRESETS or a UNetConfig."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from patchddm_fast.nn import PRESETS, UNet3D

    with FakeTensorMode():
        config = PRESETS[preset] if isinstance(preset, str) else preset
        model = UNet3D(config, fused=variant == "ours").train(train)
        x = torch.empty((batch, model.config.in_channels) + tuple(shape))
        t = torch.zeros(batch, dtype=torch.int64)
        return _unet_pass_peak(model, x, t, precision, train)


def _unet_pass_peak(model, x, t, precision: str, train: bool) -> dict:
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext()
    weights = list(model.parameters())
    with storage_tracker(external=weights + [x, t]) as tracker, torch.set_grad_enabled(train):
        with amp:
            out = model(x, t)
        if train:
            out.float().square().mean().backward()
        del out
    model.zero_grad(set_to_none=True)
    return dict(transient=tracker.peak, weights=sum(w.nbytes for w in weights))


def cuda_peak_bytes(run) -> int:
    """Peak CUDA memory allocated by run() above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_bytes(target: str, timeout: float = 1800, **kwargs) -> int:
    """Peak RSS growth of `target` (module:setup function) run once in a fresh process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # glibc raises its mmap threshold after the warm-up frees a large block, so the measured
    # run would reuse freed, still-resident heap pages and show little or no growth (seen:
    # -0.2 MiB for a training step, and +-40% from run to run). A fixed threshold keeps every
    # large tensor in its own mapping, returned to the system when freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", target, json.dumps(kwargs)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {target} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def _child(target: str, kwargs: str) -> None:
    run = _load(target)(**json.loads(kwargs))
    run()  # warm-up: lazy initialisation (allocator pools, kernels, oneDNN primitives)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    run()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
