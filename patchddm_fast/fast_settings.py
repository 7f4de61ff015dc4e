"""The fastest correct execution settings for a device: bfloat16 autocast where the hardware
computes in bfloat16 natively, and the channels_last_3d layout where the convolutions run
faster in it.

- bfloat16: CUDA GPUs from Ampere on (torch.cuda.is_bf16_supported), and CPUs with AMX or
  AVX512-BF16 instructions (Intel Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere
  bfloat16 is emulated and slower than float32, so float32 stays.
- channels_last_3d on CPUs: oneDNN's 3D convolutions are much faster in it for the narrow
  layers of PatchDDM (a training step of the small preset, batch 4 of 32^3, one thread, on an
  AMD EPYC: 1.6x in float32, 2.0x with bfloat16 autocast; the paper preset was faster in it on
  an Intel Xeon too, see issue 13's figures in benchmarks/RESULTS.md). On GPUs it pays with
  bfloat16 (tensor cores want channels last) and not in float32.

The trainer, the demo and `patchddm info` ask here; every choice can be overridden.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 in hardware (so autocast to it is a speed-up)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return False


@dataclass(frozen=True)
class FastSettings:
    precision: str        # "bf16" or "fp32"
    channels_last: bool
    reason: str           # one line a command can print

    def describe(self) -> str:
        return f"{self.precision}, {'channels_last_3d' if self.channels_last else 'contiguous'} ({self.reason})"


def fast_settings(device: torch.device | str) -> FastSettings:
    """The fastest correct precision and layout for `device` (see the module docstring)."""
    device = torch.device(device)
    bf16 = native_bfloat16(device)
    if device.type == "cpu":
        kind = "AMX" if "amx_bf16" in cpu_flags() else "AVX512-BF16" if bf16 else "no native bfloat16"
        return FastSettings("bf16" if bf16 else "fp32", True, f"CPU with {kind}")
    if device.type == "cuda":
        return FastSettings("bf16" if bf16 else "fp32", bf16,
                            "GPU with native bfloat16" if bf16 else "GPU without native bfloat16")
    return FastSettings("fp32", False, f"{device.type}: no measured preference")



def fastest_thread_count(workload, candidates=None, rounds: int = 3) -> tuple[int, dict[int, float]]:
    """The intra-op thread count under which `workload()` runs fastest here and now, with the
    best time of `rounds` runs per candidate (seconds). candidates: default 1 and every core.

    Measured, not guessed: on a machine that other jobs share, OpenMP threads that wait for a
    descheduled peer can make N threads several times slower than one; on a quiet one N wins.
    The thread count in force before the call is restored.
    """
    import os
    import time

    cores = os.cpu_count() or 1
    candidates = sorted(set(candidates or (1, cores)))
    before = torch.get_num_threads()
    best = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            workload()  # warm-up: first-call allocations and kernel selection
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                workload()
                times.append(time.perf_counter() - start)
            best[threads] = min(times)
    finally:
        torch.set_num_threads(before)
    return min(best, key=best.get), best


__all__ = ["FastSettings", "cpu_flags", "fast_settings", "fastest_thread_count", "native_bfloat16"]
