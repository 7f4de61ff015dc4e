"""Shared setup of the benchmark suite (pytest benchmarks/ --benchmark-only).

Sizes: small on the CPU by default; `--paper-scale` (or a CUDA device, where it is the
default) uses the paper's sizes (128^3 patches, 256^3 volumes).
"""

import os
import sys

# Triton kernels need the interpreter on a machine without a GPU; set before triton loads.
if not (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--paper-scale", action="store_true", default=False,
                     help="benchmark at the paper's sizes (128^3 patches, 256^3 volumes)")


@pytest.fixture(scope="session")
def paper_scale(request) -> bool:
    return request.config.getoption("--paper-scale") or torch.cuda.is_available()


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
