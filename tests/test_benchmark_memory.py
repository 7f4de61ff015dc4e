"""The CPU peak-memory measurement that every benchmark uses reports what was allocated."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import cpu_peak_bytes  # noqa: E402


def test_cpu_peak_measures_a_known_allocation():
    small = cpu_peak_bytes("benchmarks.workloads:allocate", mib=64)
    large = cpu_peak_bytes("benchmarks.workloads:allocate", mib=256)
    assert 60 * 2**20 <= small <= 80 * 2**20, small
    assert 250 * 2**20 <= large <= 275 * 2**20, large
