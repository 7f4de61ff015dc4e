"""Shared test setup. Triton kernels run under the interpreter on CPU tensors unless a GPU is
present; that switch must be set before anything imports triton, hence before torch."""

import os


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")


os.environ.setdefault("TRITON_INTERPRET", "0" if _nvidia_gpu_present() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
