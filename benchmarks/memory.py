"""Peak memory of a piece of work, measured the same way for every benchmark.

GPU: torch.cuda.max_memory_allocated over the work, minus what was allocated before it.
CPU: the work runs in a fresh Python process; its peak resident set size (VmHWM) over the
work minus its resident size just before (after imports and inputs): the allocator state of
the benchmark process cannot inflate or hide anything.

A workload is a function `setup(**kwargs) -> run` in an importable module: setup builds the
inputs (not counted), run() does the work (counted).
"""

from __future__ import annotations

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
