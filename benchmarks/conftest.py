"""Shared setup of the benchmark suite (pytest benchmarks/ --benchmark-only).

Sizes: small on the CPU by default; `--paper-scale` (or a CUDA device, where it is the
default) uses the paper's sizes (128^3 patches, 256^3 volumes).
Files that a benchmark writes besides pytest-benchmark's own output (the scaling CSV and
plot, the limits table) go to `--bench-out` (default .benchmarks/, or $OUT when set).
Without pytest-benchmark installed (a bare GPU machine), benchmarks/fallback.py stands in
for it with plain timing.

Fixtures: paper_scale, bench_device, bench_out, device_peaks (the device's matrix-product
and copy ceilings, measured once per session). Helpers for the benchmarks themselves are in
benchmarks/workloads.py (workloads, check, measure, record) and benchmarks/memory.py.
"""

import os
import sys

# Triton kernels need the interpreter on a machine without a GPU; set before triton loads.
if not (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
    # PATCHDDM_BENCH_FALLBACK=1 (with `-p no:benchmark`) tries the stand-in where pytest-benchmark exists
    HAVE_PYTEST_BENCHMARK = os.environ.get("PATCHDDM_BENCH_FALLBACK", "0") in ("", "0")
except ImportError:
    HAVE_PYTEST_BENCHMARK = False
if not HAVE_PYTEST_BENCHMARK:
    from benchmarks import fallback  # noqa: E402
    from benchmarks.fallback import benchmark  # noqa: E402,F401  (the fixture)


def pytest_addoption(parser):
    parser.addoption("--paper-scale", action="store_true", default=False,
                     help="benchmark at the paper's sizes (128^3 patches, 256^3 volumes)")
    parser.addoption("--bench-out", default=None, metavar="DIR",
                     help="folder for the benchmarks' own files (default: $OUT, else .benchmarks)")
    if not HAVE_PYTEST_BENCHMARK:
        fallback.add_options(parser)


def pytest_configure(config):
    if not HAVE_PYTEST_BENCHMARK:
        fallback.configure(config)


def pytest_collection_modifyitems(config, items):
    if not HAVE_PYTEST_BENCHMARK:
        fallback.deselect_non_benchmarks(config, items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not HAVE_PYTEST_BENCHMARK:
        fallback.summarise(config, terminalreporter)
    for line in _REPORT_LINES:
        terminalreporter.write_line(line)


_REPORT_LINES: list[str] = []


@pytest.fixture(scope="session")
def report_lines() -> list[str]:
    """Lines that benchmarks want printed at the end of the run (after pytest-benchmark's table)."""
    return _REPORT_LINES


@pytest.fixture(scope="session")
def paper_scale(request) -> bool:
    return request.config.getoption("--paper-scale") or torch.cuda.is_available()


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_out(request) -> str:
    folder = request.config.getoption("--bench-out") or os.environ.get("OUT") or ".benchmarks"
    folder = os.path.abspath(os.path.join(str(request.config.rootpath), folder))
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def device_peaks(bench_device) -> dict:
    """The device's ceilings, measured once in this run: matmul TFLOP/s per precision, copy GB/s."""
    from benchmarks.limits import measured_peaks

    return measured_peaks(bench_device)
