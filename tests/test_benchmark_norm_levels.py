"""benchmarks/norm_levels.py and upsample_parity.py run, check ours first, and report both sides."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import norm_levels  # noqa: E402


def test_one_round_at_the_smallest_level(capsys):
    results = norm_levels.main(["--threads", "1", "--levels", "16", "--rounds", "1", "--modes", "train"])
    assert [(r["dtype"], r["shape"]) for r in results] == [("float32", "116ch 16^3"), ("bfloat16", "116ch 16^3")]
    for r in results:
        assert r["ours_ms"] > 0 and r["eager_ms"] > 0 and r["ours_cpu_ms"] >= 0
    printed = capsys.readouterr().out
    assert printed.startswith(norm_levels.HEADER) and printed.count("\n| 1 | ") == 2



def test_channels_last_layout_feeds_both_sides_channels_last(capsys):
    x, _, _, grad = norm_levels.inputs(16, norm_levels.torch.float32, "channels_last")
    channels_last = norm_levels.torch.channels_last_3d
    assert x.is_contiguous(memory_format=channels_last) and not x.is_contiguous()
    assert grad.is_contiguous(memory_format=channels_last)
    results = norm_levels.main(["--threads", "1", "--levels", "16", "--rounds", "1", "--modes", "forward",
                                "--dtypes", "float32", "--layout", "channels_last"])
    assert [r["layout"] for r in results] == ["channels_last"]
    assert "| 1 | channels_last | float32 | forward |" in capsys.readouterr().out


def test_upsample_parity_benchmark_runs():
    from benchmarks import upsample_parity

    results, peaks = upsample_parity.main(["--channels", "4", "--edge", "8", "--rounds", "1"])
    assert [r["dtype"] for r in results] == ["float32", "bfloat16"]
    assert peaks["ours"] < peaks["plain"]
