"""Helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def to_acc(x):
    """The arithmetic type of every kernel: float32, or float64 for float64 data."""
    # One return after the branch: the compiler rejects a return inside a constexpr if.
    if x.dtype == tl.float64:
        y = x
    else:
        y = x.to(tl.float32)
    return y
