"""TrainConfig: checked values, the learning-rate schedule, the command-line flags."""

import argparse

import pytest
import torch

from patchddm_fast.nn import PAPER, SMALL
from patchddm_fast.train import TrainConfig, add_train_arguments, config_from_args


def config(**changes):
    return TrainConfig("data", "out", **changes)


@pytest.mark.parametrize("changes, named", [
    (dict(preset="huge"), "preset"),
    (dict(patch=20), "multiple of 8"),
    (dict(patch=0), "patch"),
    (dict(volume=16, patch=32), "at least the patch"),
    (dict(volume=60), "volume must be a multiple of 8"),
    (dict(steps=0), "steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(precision="fp64"), "precision"),
    (dict(checkpoint="all"), "checkpoint"),
    (dict(ema=1.0), "ema"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(save_every=0), "save_every"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(device="gpu0"), "device"),
    (dict(width=0), "width"),
    (dict(steps=2.5), "steps"),
    (dict(resume="yes"), "resume"),
])
def test_invalid_values_are_named(changes, named):
    with pytest.raises(ValueError, match=named):
        config(**changes)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        config(steps=0, precision="fp8", ema=2.0)
    message = str(error.value)
    assert "steps" in message and "precision" in message and "ema" in message


def test_preset_defaults_and_width():
    small, paper = config(), config(preset="paper")
    assert (small.patch_edge, small.network, small.memory_option) == (32, SMALL, "off")
    assert (paper.patch_edge, paper.learning_rate, paper.network, paper.memory_option) == (128, 1e-5, PAPER, "cheap")
    # In 16 bits the paper preset recomputes nothing (its activations are half as large); a
    # choice given is kept, and the small preset never recomputes by default.
    assert [paper.replace(precision=p).memory_option for p in ("fp32", "bf16", "fp16")] == ["cheap", "off", "off"]
    assert paper.replace(precision="bf16", checkpoint="cheap").memory_option == "cheap"
    assert small.replace(precision="fp32").memory_option == "off"
    wide = config(width=16)
    assert wide.network.model_channels == 16 and wide.network.groups == 16
    assert wide.network.channel_mult == SMALL.channel_mult


def test_learning_rate_schedule():
    c = config(lr=1e-3, warmup_steps=4, lr_schedule="cosine", lr_min_ratio=0.1, steps=104)
    assert [c.lr_at(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert c.lr_at(4) == pytest.approx(1e-3)
    assert c.lr_at(54) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the cosine's midpoint
    assert c.lr_at(104) == pytest.approx(1e-4)
    rates = [c.lr_at(s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert config(lr=3e-4).lr_at(1000) == 3e-4


def test_round_trip_through_dict():
    c = config(preset="paper", lr=2e-5, ema=None, precision="bf16")
    again = TrainConfig.from_dict(c.to_dict())
    assert again == c and isinstance(c.to_dict()["out_dir"], str)


def parse(*argv):
    parser = add_train_arguments(argparse.ArgumentParser(prog="patchddm train"))
    return config_from_args(parser.parse_args(list(argv)))


def test_command_line_flags():
    c = parse("DATA", "OUT", "--preset", "small", "--patch", "32", "--steps", "50", "--resume", "--precision",
              "bf16", "--ema", "off", "--grad-clip", "0", "--batch-size", "3", "--lr", "0.002", "--lr-schedule",
              "cosine", "--warmup-steps", "5", "--checkpoint", "cheap", "--validate-every", "10", "--num-workers",
              "0", "--seed", "7", "--device", "cpu", "--width", "12", "--volume", "48", "--keep-every", "20")
    assert (str(c.data_dir), str(c.out_dir), c.preset, c.patch, c.steps, c.resume) == ("DATA", "OUT", "small", 32, 50, True)
    assert (c.precision, c.ema, c.grad_clip, c.batch_size, c.lr, c.lr_schedule) == ("bf16", None, None, 3, 0.002, "cosine")
    assert (c.warmup_steps, c.checkpoint, c.validate_every, c.num_workers, c.seed, c.device) == (5, "cheap", 10, 0, 7, "cpu")
    assert (c.width, c.volume, c.keep_every) == (12, 48, 20)
    defaults = parse("DATA", "OUT")
    assert defaults == TrainConfig("DATA", "OUT")


def test_command_line_rejects_bad_values(capsys):
    with pytest.raises(ValueError, match="patch must be a multiple"):
        parse("DATA", "OUT", "--patch", "30")
    with pytest.raises(SystemExit):
        parse("DATA", "OUT", "--precision", "fp8")
    with pytest.raises(SystemExit):
        parse("DATA", "OUT", "--ema", "fast")
    assert "expected a number or 'off'" in capsys.readouterr().err


def test_help_explains_every_flag():
    parser = add_train_arguments(argparse.ArgumentParser(prog="patchddm train"))
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.dest
    text = parser.format_help()
    assert "--resume" in text and "--precision" in text


def test_runs_recorded_before_the_prediction_type_setting_predicted_the_noise(tmp_path):
    recorded = TrainConfig(tmp_path, tmp_path / "out").to_dict()
    del recorded["prediction_type"]
    assert TrainConfig.from_dict(recorded).prediction_type == "epsilon"
    assert TrainConfig(tmp_path, tmp_path / "out").prediction_type == "sample"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        TrainConfig(tmp_path, tmp_path / "out", prediction_type="x0")


# -- precision and channels_last: "auto" (None) resolves from fast_settings -----------------------

def test_auto_execution_takes_the_device_settings(monkeypatch):
    from patchddm_fast import fast_settings as fs
    from patchddm_fast.nn.conv import weight_grad_kernel_chosen, winograd_chosen

    for native in (True, False):
        monkeypatch.setattr(fs, "cpu_flags", lambda native=native: frozenset({"avx512_bf16"} if native else ()))
        c = config()
        assert (c.precision, c.channels_last) == (None, None)  # the defaults are "auto"
        resolved, line = c.execution("cpu")
        expected = fs.fast_settings("cpu")
        assert (resolved.precision, resolved.channels_last) == (expected.precision, expected.channels_last)
        assert resolved.precision == ("bf16" if native else "fp32")
        assert line.startswith(f"execution: {resolved.precision}, ") and "auto" in line
        assert f"recomputation {resolved.memory_option}" in line
        assert ("weight gradients" in line) == (native and weight_grad_kernel_chosen())
        assert ("Winograd convolutions" in line) == winograd_chosen(torch.bfloat16 if native else torch.float32)
        assert "\n" not in line
        # the paper preset's recomputation follows the resolved precision, and the line says so
        paper, paper_line = config(preset="paper").execution("cpu")
        assert paper.memory_option == ("off" if native else "cheap")
        assert f"recomputation {paper.memory_option}" in paper_line


def test_explicit_execution_settings_are_kept(monkeypatch):
    from patchddm_fast import fast_settings as fs

    monkeypatch.setattr(fs, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    resolved, line = config(precision="fp32", channels_last=False).execution("cpu")
    assert (resolved.precision, resolved.channels_last) == ("fp32", False) and "as given" in line
    half, _ = config(precision="fp16").execution("cpu")  # one given, the other auto
    assert (half.precision, half.channels_last) == ("fp16", fs.fast_settings("cpu").channels_last)


def test_old_checkpoints_keep_their_recorded_settings():
    # A train_config written before "auto" existed records explicit values; they stay.
    old = config(precision="fp32", channels_last=False).to_dict()
    again = TrainConfig.from_dict(old)
    assert (again.precision, again.channels_last) == ("fp32", False)
    assert TrainConfig.from_dict(dict(old, precision="bf16", channels_last=True)).channels_last is True


def test_command_line_auto_and_explicit_execution():
    assert (parse("DATA", "OUT").precision, parse("DATA", "OUT").channels_last) == (None, None)
    assert parse("DATA", "OUT", "--precision", "auto").precision is None
    assert parse("DATA", "OUT", "--channels-last").channels_last is True
    assert parse("DATA", "OUT", "--no-channels-last").channels_last is False
    with pytest.raises(ValueError, match="channels_last"):
        config(channels_last="yes")
