"""Ctrl-C (SIGINT) during training: the step in progress finishes, last.pt is written, the process
exits normally, and the run can be continued."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_helpers import tiny_config

from patchddm_fast.train import read_training_checkpoint, train
from patchddm_fast.train.checkpoints import LAST
from patchddm_fast.train.logs import STEP_LOG, read_jsonl

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
sys.path.insert(0, {helpers!r})
import torch
torch.set_num_threads(1)
from train_helpers import tiny_config
from patchddm_fast.train import train
result = train(tiny_config({data!r}, {out!r}, steps=100000, save_every=100000, num_workers=1), progress=False)
print(json.dumps({{"steps": result.steps, "interrupted": result.interrupted}}))
"""


def test_sigint_saves_a_checkpoint_and_exits(phantoms, tmp_path):
    out = tmp_path / "run"
    code = SCRIPT.format(helpers=str(Path(__file__).parent), data=str(phantoms), out=str(out))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(read_jsonl(out / STEP_LOG)) < 2:  # training has started (worker process included)
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        # As Ctrl-C in a terminal: the signal reaches the whole process group, loader worker included.
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["interrupted"] and result["steps"] >= 2
    _, extra = read_training_checkpoint(out / LAST)
    assert extra["step"] == result["steps"]
    assert [r["step"] for r in read_jsonl(out / STEP_LOG)] == list(range(1, result["steps"] + 1))
    assert "stopped by SIGINT" in stderr and not list(out.glob("*.tmp"))

    resumed = train(tiny_config(phantoms, out, steps=result["steps"] + 1, resume=True), progress=False)
    assert (resumed.steps, resumed.interrupted) == (result["steps"] + 1, False)
