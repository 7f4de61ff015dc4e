"""(h + skip) / 2 in Triton: one pass over flat contiguous memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._schemas import triton_op
from ..avg_skip import check_arguments, fake_avg_skip, register_autograd
from ._common import to_acc

BLOCK = 2048


@triton.jit
def _avg_skip_kernel(h_ptr, skip_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # int64 offsets: a batch of 256^3 volumes with many channels exceeds 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = to_acc(tl.load(h_ptr + offs, mask=mask))
    s = to_acc(tl.load(skip_ptr + offs, mask=mask))
    tl.store(out_ptr + offs, ((h + s) * 0.5).to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("avg_skip")
def avg_skip(h, skip):
    check_arguments("patchddm_triton::avg_skip", h, skip, kernel_layout=True)
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    n = h.numel()
    if n:
        _avg_skip_kernel[(triton.cdiv(n, BLOCK),)](h, skip, out, n, BLOCK=BLOCK)
    return out


avg_skip.register_fake(fake_avg_skip)
register_autograd("patchddm_triton::avg_skip")
