"""A plain-timing stand-in for pytest-benchmark, for machines that lack it (a bare GPU box).

benchmarks/conftest.py installs it only when `import pytest_benchmark` fails. It offers what
the suite uses: the `benchmark` fixture (calling it, `pedantic`, `group`, `extra_info`,
`stats.stats.{min,max,mean,median,stddev,rounds}`), the `benchmark` marker's group,
`--benchmark-only` and `--benchmark-json` (the same layout as pytest-benchmark's for the
fields benchmarks/report.py reads), and a short table at the end of the run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import pytest

_FINISHED: list["FallbackBenchmark"] = []


class _Stats:
    def __init__(self, data: list[float]):
        self.data = data
        self.rounds = len(data)
        self.min, self.max = min(data), max(data)
        self.mean = statistics.fmean(data)
        self.median = statistics.median(data)
        self.stddev = statistics.stdev(data) if len(data) > 1 else 0.0
        self.total = sum(data)

    def as_dict(self) -> dict:
        return dict(min=self.min, max=self.max, mean=self.mean, median=self.median, stddev=self.stddev,
                    rounds=self.rounds, total=self.total, iterations=1, ops=1 / self.mean if self.mean else 0.0)


class _Metadata:
    def __init__(self, data):
        self.stats = _Stats(data)


class FallbackBenchmark:
    """The part of pytest-benchmark's BenchmarkFixture that the suite uses."""

    def __init__(self, node, group: str | None):
        self.name, self.fullname = node.name, node.nodeid
        self.params = getattr(getattr(node, "callspec", None), "params", None)
        self.group = group
        self.extra_info: dict = {}
        self.stats: _Metadata | None = None

    def _run(self, function, args, kwargs, rounds: int, warmup_rounds: int, iterations: int, setup=None):
        result = None
        for _ in range(warmup_rounds):
            result = function(*args, **kwargs)
        seconds = []
        for _ in range(rounds):
            if setup is not None:
                setup()
            start = time.perf_counter()
            for _ in range(iterations):
                result = function(*args, **kwargs)
            seconds.append((time.perf_counter() - start) / iterations)
        self.stats = _Metadata(seconds)
        _FINISHED.append(self)
        return result

    def __call__(self, function, *args, **kwargs):
        # pytest-benchmark calibrates rounds to its time budget; here: 1 warm-up, then rounds
        # until 0.5 s or 20 rounds, whichever comes first.
        start = time.perf_counter()
        function(*args, **kwargs)
        once = max(time.perf_counter() - start, 1e-6)
        rounds = int(min(20, max(3, 0.5 / once)))
        return self._run(function, args, kwargs, rounds, 0, 1)

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        return self._run(target, tuple(args), kwargs or {}, rounds, warmup_rounds, iterations, setup)

    def as_dict(self) -> dict:
        return dict(group=self.group, name=self.name, fullname=self.fullname, params=self.params,
                    extra_info=self.extra_info, stats=self.stats.stats.as_dict())


def add_options(parser) -> None:
    group = parser.getgroup("benchmark (fallback: pytest-benchmark is not installed)")
    group.addoption("--benchmark-only", action="store_true", default=False, help="run only benchmarks")
    group.addoption("--benchmark-json", default=None, metavar="PATH", help="write the results as JSON")


def configure(config) -> None:
    config.addinivalue_line("markers", "benchmark(group=None): pytest-benchmark's marker (fallback)")


def deselect_non_benchmarks(config, items) -> None:
    if not config.getoption("--benchmark-only"):
        return
    kept = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if item not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def benchmark(request):
    marker = request.node.get_closest_marker("benchmark")
    return FallbackBenchmark(request.node, marker.kwargs.get("group") if marker else None)


def summarise(config, terminalreporter) -> None:
    finished = [b for b in _FINISHED if b.stats is not None]
    if not finished:
        return
    path = config.getoption("--benchmark-json")
    if path:
        document = dict(machine_info=dict(node=platform.node(), python_version=platform.python_version(),
                                          fallback="benchmarks/fallback.py"),
                        benchmarks=[b.as_dict() for b in finished])
        with open(path, "w") as f:
            json.dump(document, f, indent=1, default=str)
    terminalreporter.section("benchmarks (plain timing, pytest-benchmark not installed)")
    for b in sorted(finished, key=lambda b: (str(b.group), b.name)):
        s = b.stats.stats
        terminalreporter.write_line(f"{str(b.group)[:44]:44s} {b.name[:52]:52s} median {s.median * 1e3:10.3f} ms"
                                    f"  min {s.min * 1e3:10.3f} ms  rounds {s.rounds}")
