"""Checkpoints never lose work: a resumed run is the uninterrupted run, step for step."""

import torch

from patchddm_fast.train import read_training_checkpoint, train
from patchddm_fast.train.checkpoints import LAST
from patchddm_fast.train.logs import STEP_LOG, read_jsonl

from train_helpers import tiny_config


def final_state(out_dir):
    model, extra = read_training_checkpoint(out_dir / LAST)
    return model.state_dict(), extra


def assert_same_run(a, b):
    (weights_a, extra_a), (weights_b, extra_b) = final_state(a), final_state(b)
    assert extra_a["step"] == extra_b["step"] and extra_a["samples_done"] == extra_b["samples_done"]
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    for name, value in extra_a["ema"]["weights"].items():
        assert torch.equal(value, extra_b["ema"]["weights"][name]), f"EMA {name}"
    state_a, state_b = extra_a["optimizer"]["state"], extra_b["optimizer"]["state"]
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)
    losses_a = [(r["step"], r["loss"]) for r in read_jsonl(a / STEP_LOG)]
    losses_b = [(r["step"], r["loss"]) for r in read_jsonl(b / STEP_LOG)]
    assert losses_a == losses_b
    assert [s for s, _ in losses_a] == list(range(1, extra_a["step"] + 1))


def test_more_steps_with_resume_equals_one_run(phantoms, tmp_path):
    """`--steps 3` then `--steps 5 --resume` == `--steps 5` (constant rate after a warmup)."""
    settings = dict(warmup_steps=2, save_every=100)
    straight = train(tiny_config(phantoms, tmp_path / "straight", steps=5, **settings), progress=False)
    first = train(tiny_config(phantoms, tmp_path / "split", steps=3, **settings), progress=False)
    assert (first.steps, first.interrupted) == (3, False)  # the end of a run is always saved
    second = train(tiny_config(phantoms, tmp_path / "split", steps=5, resume=True, **settings), progress=False)
    assert (second.steps, straight.steps) == (5, 5)
    assert second.last_loss == straight.last_loss
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_interrupted_run_resumes_exactly(phantoms, tmp_path):
    """A cosine schedule with warmup, EMA and clipping, interrupted after step 2 by a callback
    raising KeyboardInterrupt (what Ctrl-C does outside the main thread), then resumed."""
    settings = dict(steps=5, lr_schedule="cosine", warmup_steps=2, save_every=100, grad_clip=0.05)
    straight = train(tiny_config(phantoms, tmp_path / "straight", **settings), progress=False)

    def interrupt(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    stopped = train(tiny_config(phantoms, tmp_path / "split", **settings), progress=False, callback=interrupt)
    assert (stopped.steps, stopped.interrupted) == (2, True)
    assert final_state(tmp_path / "split")[1]["step"] == 2
    resumed = train(tiny_config(phantoms, tmp_path / "split", resume=True, **settings), progress=False)
    assert (resumed.steps, resumed.interrupted) == (5, False)
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_callback_stop_request_saves_and_resume_is_a_no_op_when_done(phantoms, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(phantoms, out, steps=4, save_every=100), progress=False,
                   callback=lambda step, loss: step == 1)
    assert (result.steps, result.interrupted, result.checkpoint) == (1, True, out / LAST)
    done = train(tiny_config(phantoms, out, steps=1, resume=True), progress=False)
    assert (done.steps, done.interrupted) == (1, False)
    assert len(read_jsonl(out / STEP_LOG)) == 1
