"""Where the golden data of the original implementation lives (PATCHDDM_GOLDEN overrides)."""

import os

import pytest
import torch

GOLDEN_DIR = os.environ.get("PATCHDDM_GOLDEN", "/work/shared/golden")


@pytest.fixture(scope="session")
def golden_dir() -> str:
    if not os.path.isfile(os.path.join(GOLDEN_DIR, "reference_unet_small.npz")):
        pytest.fail(f"golden data not found in {GOLDEN_DIR}; set PATCHDDM_GOLDEN to the folder holding "
                    f"reference_unet_small.npz and reference_unet_paper_config_shapes.json")
    return GOLDEN_DIR


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The networks here are tiny: threads gain nothing, and on a busy machine OpenMP's waits
    # for a descheduled thread made steps 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
