"""Data-parallel training: torchrun with 2 gloo processes on the CPU makes the same updates as one
process on the combined batch, and only rank 0 writes."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from train_helpers import tiny_config

from patchddm_fast.train import read_training_checkpoint, train
from patchddm_fast.train.checkpoints import LAST
from patchddm_fast.train.logs import STEP_LOG, read_jsonl

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import sys
sys.path.insert(0, {helpers!r})
import torch
torch.set_num_threads(1)
from train_helpers import tiny_config
from patchddm_fast.train import train
result = train(tiny_config({data!r}, {out!r}, steps=3, batch_size=1, save_every=100, device="cpu"), progress=False)
assert result.steps == 3 and not result.interrupted
"""


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(phantoms, tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(helpers=str(Path(__file__).parent), data=str(phantoms), out=str(ddp_out)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    train(tiny_config(phantoms, single_out, steps=3, batch_size=2, save_every=100), progress=False)

    ddp_model, ddp = read_training_checkpoint(ddp_out / LAST)
    single_model, single = read_training_checkpoint(single_out / LAST)
    assert (ddp["world_size"], ddp["samples_done"]) == (2, single["samples_done"]) == (2, 6)
    # Not element by element: biases that feed straight into a GroupNorm of one channel per group
    # get a zero gradient up to rounding, which Adam turns into steps of rounding-noise size in
    # either run. Those are a tiny part of the weights' movement; a missing or wrong gradient
    # reduction changes most weights by a step's size.
    initial = tiny_initial_weights()
    ddp_weights, single_weights = ddp_model.state_dict(), single_model.state_dict()
    difference = torch.cat([(ddp_weights[n] - v).flatten() for n, v in single_weights.items()])
    movement = torch.cat([(v - initial[n]).flatten() for n, v in single_weights.items()])
    assert movement.norm() > 0.1
    # 1e-2 of the movement: rounding-noise steps stay far below it, a missing or wrong gradient
    # reduction is of the order of the movement itself.
    assert difference.norm() < 1e-2 * movement.norm(), (difference.norm(), movement.norm())
    agree = [n for n, v in single_weights.items() if torch.allclose(ddp_weights[n], v, rtol=1e-4, atol=1e-6)]
    assert len(agree) > 0.8 * len(single_weights)
    ddp_losses = [r["loss"] for r in read_jsonl(ddp_out / STEP_LOG)]
    single_losses = [r["loss"] for r in read_jsonl(single_out / STEP_LOG)]
    assert len(ddp_losses) == 3  # one writer
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in ddp_out.iterdir()) == sorted(p.name for p in single_out.iterdir())


def tiny_initial_weights():
    from patchddm_fast.nn import UNet3D

    config = tiny_config("data", "out")
    torch.manual_seed(config.seed)
    return UNet3D(config.network).state_dict()
