"""Input checks of the public ops: each error names the op, the argument and the problem."""

from __future__ import annotations

import functools

import torch

from .._extension import EXTENSION
from ..fast_settings import cpu_flags

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def check_like(op: str, name: str, t, ref: torch.Tensor, ref_name: str, *, shape=True, dtype=True) -> None:
    """t must match ref in device (always), shape and dtype (when asked)."""
    check_tensor(op, name, t, dtypes=None)
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {ref.dtype} like {ref_name}")


def check_cpu(op: str, **tensors) -> None:
    """Each given tensor (None: absent) must be on the CPU: the op has CPU kernels only."""
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device}; the kernel is for CPU tensors")


def check_contiguous(op: str, **tensors) -> None:
    """Each given tensor (None: absent) must be contiguous: the layout the kernels read."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first); got strides {t.stride()}")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 inputs, float32 for all others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The CPU flags (/proc/cpuinfo) that the convolution kernels' instructions need.
AVX512 = ("avx512f", "avx512bw", "avx512vl")
AVX512_BF16 = AVX512 + ("avx512_bf16",)


@functools.cache  # asked at every training convolution's call; the answer does not change in a process
def cpu_kernel_runs(op: str, needs: tuple[str, ...] = AVX512_BF16) -> bool:
    """Whether patchddm::<op>, a CPU kernel written for the instructions `needs` names, runs
    here: the extension is built with it and the CPU has them (the op itself refuses others)."""
    return EXTENSION.has_kernel(op, "CPU") and set(needs) <= cpu_flags()


def refuse_cpu_kernel(op: str, needs: tuple[str, ...] = AVX512_BF16) -> None:
    """A clear error, saying why, where cpu_kernel_runs(op, needs) is False."""
    if cpu_kernel_runs(op, needs):
        return
    why = (EXTENSION.error if not EXTENSION.loaded
           else "the extension was built without it: rebuild it" if not EXTENSION.has_kernel(op, "CPU")
           else f"this CPU has no {'AVX512-BF16' if 'avx512_bf16' in needs else 'AVX-512'}")
    raise RuntimeError(f"{op}: the kernel cannot run here ({why}); use {op}_reference")
