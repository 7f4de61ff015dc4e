"""patchddm_fast.info(): what this installation can run, and why not where it cannot."""

from __future__ import annotations

import os
import platform

import torch

from ._extension import EXTENSION
from .ops._backends import BACKENDS, TRITON_INTERPRET, TRITON_REASON, FastOp, get_backend_override


def _devices() -> list[str]:
    cpu = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if EXTENSION.loaded and hasattr(torch.ops.patchddm, "cpu_isa"):
        cpu += f", C++ loops for {torch.ops.patchddm.cpu_isa()} (PATCHDDM_CPU_ISA caps it)"
    lines = [cpu]
    from .nn.conv import conv_status

    lines.append(f"cpu: training's 3x3x3 convolutions: {conv_status()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("cuda: no GPU visible")
    return lines


def _override() -> str:
    """The backend override, and where it comes from; an invalid PATCHDDM_BACKEND is named as such."""
    override = get_backend_override()
    raw = os.environ.get("PATCHDDM_BACKEND")
    from_env = raw is not None and raw.strip().lower() == override
    if override is not None:
        return f"{override} ({'PATCHDDM_BACKEND' if from_env else 'set_backend'})"
    if raw is None or not raw.strip():
        return "none (PATCHDDM_BACKEND unset)"
    if raw.strip().lower() in BACKENDS:
        return f"none (PATCHDDM_BACKEND={raw!r} cleared by set_backend(None))"
    return f"none: PATCHDDM_BACKEND={raw!r} is invalid and ignored (valid values: {', '.join(BACKENDS)})"


def info() -> str:
    """A report of versions, devices, and which backend runs each op on each device."""
    from . import __version__

    lines = [
        f"patchddm_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch CUDA {torch.version.cuda or 'none (CPU build)'}",
        f"compiled extension: {'loaded from ' + str(EXTENSION.path) if EXTENSION.loaded else EXTENSION.error}",
        f"triton: {TRITON_REASON}{' (TRITON_INTERPRET=1: runs on CPU tensors)' if TRITON_INTERPRET else ''}",
        f"backend override: {_override()}",
        "devices:",
        *("  " + d for d in _devices()),
        "ops (backend: status):",
    ]
    for op in FastOp.registry.values():
        lines.append(f"  {op.name}")
        for device_type, backends in (("cpu", ("cpp", "triton")), ("cuda", ("cuda", "triton"))):
            for backend in backends:
                why = op.why_unavailable(backend, device_type)
                if why is None and device_type == "cuda" and not torch.cuda.is_available():
                    status = ("built" if backend == "cuda" else "importable") + " (no GPU here to run it)"
                else:
                    status = "available" if why is None else f"unavailable: {why}"
                lines.append(f"    {device_type:4s} {backend:6s}: {status}")
        default_cpu = op.resolve(torch.device("cpu"))
        lines.append(f"    default on cpu: {default_cpu}"
                     + (f", on cuda: {op.resolve(torch.device('cuda'))}" if torch.cuda.is_available() else ""))
    return "\n".join(lines)
