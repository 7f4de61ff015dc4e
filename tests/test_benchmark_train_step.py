"""benchmarks/train_step.py runs, checks every float32 case's loss first, and reports them all."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import train_step  # noqa: E402


def test_one_round_of_the_small_preset(capsys):
    best, losses = train_step.main(["--preset", "small", "--size", "16", "--rounds", "1"])
    assert list(best) == list(losses) and len(best) == 11
    assert all(wall > 0 and cpu >= 0 for wall, cpu in best.values())
    printed = capsys.readouterr().out
    assert printed.count("\n| original float32 | ") == 1 and printed.count("\n| ours ") == 9


def test_fresh_processes_and_a_choice_of_cases(capsys):
    best, losses = train_step.main(["--preset", "small", "--size", "16", "--rounds", "1", "--fresh",
                                    "--cases", "auto ("])
    # the original's two cases always run; "auto (" picks the trainer's automatic settings alone
    assert list(best)[:2] == ["original float32", "original bf16 autocast"] and len(best) == 3
    assert list(best)[2].startswith("ours auto (") and list(losses) == list(best)
    assert all(wall > 0 and cpu >= 0 for wall, cpu in best.values())
    assert "a fresh process per case and round" in capsys.readouterr().out
