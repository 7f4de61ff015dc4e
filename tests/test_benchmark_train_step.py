"""benchmarks/train_step.py runs, checks every float32 case's loss first, and reports them all."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import train_step  # noqa: E402


def test_one_round_of_the_small_preset(capsys):
    best, losses = train_step.main(["--preset", "small", "--size", "16", "--rounds", "1"])
    assert list(best) == list(losses) and len(best) == 8
    assert all(wall > 0 and cpu >= 0 for wall, cpu in best.values())
    printed = capsys.readouterr().out
    assert printed.count("\n| original float32 | ") == 1 and printed.count("\n| ours ") == 6
