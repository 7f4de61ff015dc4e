"""Shared test setup. Triton kernels run under the interpreter on CPU tensors unless a GPU is
present; that switch must be set before anything imports triton, hence before torch."""

import os


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")


os.environ.setdefault("TRITON_INTERPRET", "0" if _nvidia_gpu_present() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every core unless the caller chose a thread count (the suite must pass with OMP_NUM_THREADS=1 too).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, os.cpu_count() or 1))

# Data produced by the original PatchDDM implementation; tests/golden/README.md says how.
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_SMALL = os.path.join(GOLDEN_DIR, "reference_unet_small.npz")
GOLDEN_PAPER_SHAPES = os.path.join(GOLDEN_DIR, "reference_unet_paper_config_shapes.json")


@pytest.fixture(scope="session")
def golden_dir() -> str:
    for path in (GOLDEN_SMALL, GOLDEN_PAPER_SHAPES):
        if not os.path.isfile(path):
            pytest.fail(f"golden data missing: {path} (it is part of the repository; restore it with git)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
