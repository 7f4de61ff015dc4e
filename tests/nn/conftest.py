"""Where the golden data of the original implementation lives (PATCHDDM_GOLDEN overrides)."""

import os

import pytest

GOLDEN_DIR = os.environ.get("PATCHDDM_GOLDEN", "/work/shared/golden")


@pytest.fixture(scope="session")
def golden_dir() -> str:
    if not os.path.isfile(os.path.join(GOLDEN_DIR, "reference_unet_small.npz")):
        pytest.fail(f"golden data not found in {GOLDEN_DIR}; set PATCHDDM_GOLDEN to the folder holding "
                    f"reference_unet_small.npz and reference_unet_paper_config_shapes.json")
    return GOLDEN_DIR
