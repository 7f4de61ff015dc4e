"""Scaling: time and peak memory of one sampling step and one training step against the volume
size and the ensemble size (batch), ours against the baseline pattern, side by side per size.

    pytest benchmarks/test_scaling.py --benchmark-only                 # CPU: small U-Net, 16^3..48^3
    pytest benchmarks/test_scaling.py --benchmark-only --paper-scale   # CPU: paper U-Net, 64^3, 128^3
    (on a GPU: paper U-Net, 64^3..448^3 sampling while memory allows, 64^3..192^3 training)

Each point first checks (at the smallest size of each series) that ours computes what the
baseline computes, then measures its peak memory (GPU: max_memory_allocated; CPU: live
tensors of one step plus what the workload holds, see benchmarks/scaling.py for why not RSS
here) and times it. At the end the module writes, to --bench-out (default .benchmarks/):
scaling-<device>.csv, scaling-<device>.png and scaling-<device>-capacity.{md,json}: the
largest cubic volume each sampling mode fits on a 24, 40 and 80 GiB GPU, from the measured
points on a GPU and, everywhere, from the paper U-Net counted on fake tensors (64^3..512^3).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import scaling
from benchmarks.workloads import assert_matches, record, timed

_POINTS: list[scaling.Point] = []
_FAILED: set = set()
_CHECKED: set = set()


def _plan(config) -> scaling.Plan:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return scaling.default_plan(device, config.getoption("--paper-scale"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = scaling.plan_cases(_plan(metafunc.config))
        ids = [f"{c['mode']}-{c['variant']}-{c['precision']}-{c['size']}^3-x{c['members']}" for c in cases]
        metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="module", autouse=True)
def scaling_report(bench_out, bench_device, report_lines):
    yield
    points = list(_POINTS) + scaling.counted_points("paper")
    report = scaling.write_report(points, bench_out, bench_device.type)
    report_lines.append("")
    report_lines.append(f"Largest cubic volume per sampling mode (1 member; capacity minus 1 GiB reserve); "
                        f"files: {report['csv']}, {report['png']}")
    report_lines.extend(report["table"].splitlines())


def _check(case, device):
    """Ours against the baseline on fresh workloads, once per series (mode, precision, members)."""
    key = (case["mode"], case["precision"], case["members"])
    if key in _CHECKED:
        return
    from benchmarks import workloads

    common = dict(preset=case["preset"], size=case["size"], device=device.type)
    if case["mode"] == "sample":
        expected = workloads.sampling_step("baseline", members=case["members"], **common)()
        actual = workloads.sampling_step(case["variant"], members=case["members"], precision=case["precision"],
                                         **common)()
    else:
        expected = workloads.training_step("baseline", batch=case["members"], baseline_noise="philox", **common)()
        actual = workloads.training_step(case["variant"], batch=case["members"], precision=case["precision"],
                                         baseline_noise="philox", **common)()
    assert_matches(actual, expected, case["precision"], what=f"{case['mode']} step, {case['variant']}")
    _CHECKED.add(key)


def test_scaling(benchmark, bench_device, case, request):
    series = (case["mode"], case["variant"], case["precision"], case["members"] > 1)
    if series in _FAILED:
        pytest.skip(f"a smaller {case['mode']} step of {case['variant']} {case['precision']} ran out of memory")
    _check(case, bench_device)
    size, members = case["size"], case["members"]
    benchmark.group = (f"scaling {case['mode']} {case['preset']} {size}^3 x{members} {bench_device.type}")
    try:
        peak, run, source = scaling.peak_of(device=bench_device, **case)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not scaling.is_out_of_memory(error):
            raise
        _FAILED.add(series)
        _POINTS.append(scaling.Point(case["mode"], case["variant"], case["precision"], case["preset"], size,
                                     members, None, None, bench_device.type, "out of memory", "OOM"))
        pytest.skip(f"out of memory: {case}")
    rounds = _plan(request.config).rounds
    benchmark.pedantic(timed(run, bench_device), rounds=rounds, warmup_rounds=0, iterations=1)
    name = f"{case['variant']}-{case['precision']}"
    baseline = "baseline-float32" if case["mode"] == "sample" else f"baseline-{case['precision']}"
    record(benchmark, name, baseline, peak_bytes=peak, memory_source=source, mode=case["mode"], size=size,
           members=members, voxels=members * size**3, bytes_per_voxel=round(peak / (members * size**3), 1))
    _POINTS.append(scaling.Point(case["mode"], case["variant"], case["precision"], case["preset"], size, members,
                                 peak, benchmark.stats.stats.median, bench_device.type, source))

