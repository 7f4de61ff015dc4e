"""benchmarks/conv_weight_grad.py runs, checks both gradients first, and reports both sides."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import conv_weight_grad  # noqa: E402
from patchddm_fast.ops.conv3d_weight_grad import kernel_available  # noqa: E402


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled extension and a CPU with AVX512-BF16")
def test_one_round_at_the_smallest_level(capsys):
    results = conv_weight_grad.main(["--threads", "1", "--levels", "8", "--rounds", "1"])
    assert [(r["threads"], r["level"]) for r in results] == [(1, "8")]
    assert all(t > 0 for t in results[0]["best"].values())
    # ours keeps float32, oneDNN rounds to bfloat16: the check's thresholds, and ours the closer
    assert results[0]["errors"]["ours"] < 1e-4 and results[0]["errors"]["ours"] < results[0]["errors"]["oneDNN"]
    assert "| 1 | 116->116 ch 8^3 |" in capsys.readouterr().out


@pytest.mark.skipif(kernel_available(), reason="this CPU runs the kernel (the message is for CPUs without it)")
def test_says_why_it_cannot_run():
    with pytest.raises(SystemExit, match="the kernel cannot run here"):
        conv_weight_grad.main(["--levels", "8", "--rounds", "1"])
