"""CMakeLists.txt builds csrc/ into a LibTorch library that torch.ops.load_library loads, and
whose ops compute what the Python-built extension computes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchddm_fast  # noqa: F401  (loads the Python-built ops for the comparison)

ROOT = Path(__file__).resolve().parents[1]

LOAD_AND_RUN = """
import sys, torch
torch.ops.load_library(sys.argv[1])
inputs = torch.load(sys.argv[2])
torch.save(torch.ops.patchddm.avg_skip(*inputs), sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed on this machine")
def test_cmake_library_loads_and_matches(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 # CPU only: the Python build already compiles every .cu file; this checks that
                 # the CMake path builds and registers the same ops.
                 "-DPATCHDDM_WITH_CUDA=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for command in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    library = build / "libpatchddm_ops.so"
    assert library.exists()

    h, skip = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    torch.save((h, skip), tmp_path / "inputs.pt")
    # A fresh process: this one already holds the patchddm namespace from the Python build.
    result = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(library), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), torch.ops.patchddm.avg_skip(h, skip))
