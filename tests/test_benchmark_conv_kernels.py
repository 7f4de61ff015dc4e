"""benchmarks/conv_kernels.py runs, checks every pass first, and reports both sides."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import conv_kernels  # noqa: E402
from patchddm_fast.ops.conv3d_weight_grad import kernel_available as weight_grad_available  # noqa: E402
from patchddm_fast.ops.conv3d_winograd import kernel_available  # noqa: E402

RUNS = {"bfloat16": kernel_available(torch.bfloat16) and weight_grad_available(),
        "float32": kernel_available(torch.float32)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_round_at_the_smallest_level(dtype, capsys):
    if not RUNS[dtype]:
        pytest.skip(f"needs the compiled extension and a CPU that runs the {dtype} kernels")
    results = conv_kernels.main(["--threads", "1", "--levels", "8", "--rounds", "1", "--dtypes", dtype])
    passes = conv_kernels.PASSES if dtype == "bfloat16" else ("forward", "input")  # no float32 weight kernel
    assert [(r["threads"], r["level"], r["which"], r["dtype"]) for r in results] == [
        (1, "8", which, dtype) for which in passes]
    assert all(t > 0 for r in results for t in r["best"].values())
    # the check's thresholds; our bfloat16 weight gradient keeps float32, oneDNN rounds to bfloat16
    assert all(r["errors"]["ours"] <= conv_kernels.LIMITS[conv_kernels.DTYPES[dtype], r["which"]] for r in results)
    if dtype == "bfloat16":
        weight = results[2]["errors"]
        assert weight["ours"] < 1e-4 and weight["ours"] < weight["oneDNN"]
    printed = capsys.readouterr().out
    assert all(f"| 1 | {dtype} | {which} | 116->116 ch 8^3 |" in printed for which in passes)


@pytest.mark.parametrize("option,match", [("--passes=forward,backward", r"unknown passes \['backward'\]"),
                                          ("--dtypes=float16", r"unknown dtypes \['float16'\]")])
def test_refuses_unknown_passes_and_dtypes(option, match):
    with pytest.raises(SystemExit, match=match):
        conv_kernels.main([option])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_says_why_it_cannot_run(dtype):
    if RUNS[dtype]:
        pytest.skip(f"this CPU runs the {dtype} kernels (the message is for CPUs without them)")
    with pytest.raises(SystemExit, match=f"the {dtype} kernels cannot run here"):
        conv_kernels.main(["--levels", "8", "--rounds", "1", "--dtypes", dtype])
