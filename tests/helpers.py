"""What the tests of every op share: devices, dtypes, tolerances, backends, comparisons."""

from __future__ import annotations

import pytest
import torch

from patchddm_fast.ops import FastOp
from patchddm_fast.ops._backends import TRITON_INTERPRET

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) for comparing a kernel with its float32-computing reference: the kernels and
# the references round the same float32 values, so the slack is a few ulps of the output dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def backend_params(op_name: str):
    """pytest params (device, backend) for every backend of an op that this machine can run.

    Backends that exist in principle but cannot run here (CUDA without a GPU; Triton on CPU
    without TRITON_INTERPRET) are not listed: there is nothing here to test them on. A backend
    that should run but does not (say the compiled extension failed to build) fails its test,
    since it is still listed and the call raises BackendUnavailable.
    """
    assert op_name in FastOp.registry, op_name
    params = [pytest.param("cpu", "cpp", id="cpu-cpp"), pytest.param("cpu", "torch", id="cpu-torch")]
    if TRITON_INTERPRET:
        params.append(pytest.param("cpu", "triton", id="cpu-triton", marks=pytest.mark.triton))
    if torch.cuda.is_available():
        params += [pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
                   pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.gpu)]
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """torch's assert_close at TOLERANCES of `dtype` (default: expected's), times `scale` where
    a caller's computation rounds more than once (it says why)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.float() if actual.dtype != torch.float64 else actual,
                               expected.float() if expected.dtype != torch.float64 else expected,
                               atol=atol * scale, rtol=rtol * scale, msg=msg or None)
