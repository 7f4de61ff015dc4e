"""benchmarks/conv_bf16.py runs, checks every pass first, and reports both sides."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import conv_bf16  # noqa: E402
from patchddm_fast.ops.conv3d_winograd import kernel_available  # noqa: E402


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled extension and a CPU with AVX512-BF16")
def test_one_round_at_the_smallest_level(capsys):
    results = conv_bf16.main(["--threads", "1", "--levels", "8", "--rounds", "1"])
    assert [(r["threads"], r["level"], r["which"]) for r in results] == [
        (1, "8", "forward"), (1, "8", "input"), (1, "8", "weight")]
    assert all(t > 0 for r in results for t in r["best"].values())
    # the check's thresholds; our weight gradient keeps float32, oneDNN rounds to bfloat16
    assert all(r["errors"]["ours"] <= conv_bf16.LIMITS[r["which"]] for r in results)
    weight = results[2]["errors"]
    assert weight["ours"] < 1e-4 and weight["ours"] < weight["oneDNN"]
    printed = capsys.readouterr().out
    assert all(f"| 1 | {which} | 116->116 ch 8^3 |" in printed for which in conv_bf16.PASSES)


def test_refuses_an_unknown_pass():
    with pytest.raises(SystemExit, match=r"unknown passes \['backward'\]"):
        conv_bf16.main(["--passes", "forward,backward"])


@pytest.mark.skipif(kernel_available(), reason="this CPU runs the kernels (the message is for CPUs without them)")
def test_says_why_it_cannot_run():
    with pytest.raises(SystemExit, match="the kernels cannot run here"):
        conv_bf16.main(["--levels", "8", "--rounds", "1"])
