"""Helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def to_acc(x):
    """The arithmetic type of every kernel: float32, or float64 for float64 data."""
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32)
