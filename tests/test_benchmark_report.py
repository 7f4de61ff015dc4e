"""The compact table of benchmarks/report.py and the stand-in timing of benchmarks/fallback.py."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fallback, report  # noqa: E402


def _bench(group, param, median, **extra):
    return dict(group=group, name=f"test_x[{param}]", stats=dict(median=median), extra_info=extra)


def test_rows_put_ours_beside_eager_and_compile():
    document = dict(benchmarks=[
        _bench("op a", "eager", 4.0, peak_mib=100.0),
        _bench("op a", "compile", 2.0),
        _bench("op a", "cuda", 1.0, GBps=900.0, fraction_of_peak=0.3, peak_mib=50.0),
        _bench("op a", "triton", 0.5),
        _bench("op a", "copy", 0.1),
        _bench("step", "x", 3.0, name="baseline-float32"),
        _bench("step", "x", 1.5, name="ours-bfloat16"),
        _bench("step", "x", 2.0, name="baseline-bfloat16"),
    ])
    rows = {(r["group"], r["ours"]): r for r in report.rows([document])}
    assert set(rows) == {("op a", "cuda"), ("op a", "triton"), ("step", "ours-bfloat16")}
    cuda = rows[("op a", "cuda")]
    assert (cuda["eager_s"], cuda["compile_s"], cuda["ratio"], cuda["memory"]) == (4.0, 2.0, 4.0, 0.5)
    assert cuda["rate"] == "900 GB/s (30% of peak)"
    assert rows[("op a", "triton")]["ratio"] == 8.0
    # the float32 baseline is the reference of the group, not the bf16 one
    assert rows[("step", "ours-bfloat16")]["ratio"] == 2.0
    table = report.format_table(report.rows([document]), "H200")
    assert table.count("\n") == 4 and "| H200 | op a | cuda | 1.00 s | 4.00 s | 2.00 s | 4.00x | 0.50 |" in table


def test_merge_keeps_every_benchmark(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(dict(machine_info=dict(node=f"n{i}"), benchmarks=[_bench("g", f"b{i}", 1.0)])))
        paths.append(str(path))
    merged = report.merge(paths)
    assert merged["machine_info"]["node"] == "n0"
    assert [b["name"] for b in merged["benchmarks"]] == ["test_x[b0]", "test_x[b1]"]


class _Node:
    name, nodeid = "test_y[a]", "benchmarks/test_y.py::test_y[a]"


def test_fallback_pedantic_times_rounds_after_warmup():
    calls = []
    bench = fallback.FallbackBenchmark(_Node(), "group")
    result = bench.pedantic(lambda x: calls.append(x) or len(calls), args=(7,), rounds=4, warmup_rounds=2)
    assert result == 6 and len(calls) == 6
    stats = bench.stats.stats
    assert stats.rounds == 4 and stats.min <= stats.median <= stats.max
    entry = bench.as_dict()
    assert entry["group"] == "group" and entry["stats"]["rounds"] == 4 and entry["name"] == "test_y[a]"
