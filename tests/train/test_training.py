"""Training runs on tiny phantoms: the loss falls, every step is logged, the options work."""

import math

import pytest
import torch
from train_helpers import tiny_config

from patchddm_fast.diffusion import NoiseSchedule, diffusion_loss
from patchddm_fast.ops import philox_normal
from patchddm_fast.train import load_trained_model, read_training_checkpoint, train
from patchddm_fast.train.checkpoints import LAST
from patchddm_fast.train.logs import STEP_LOG, VALIDATION_LOG, read_jsonl


def test_short_run_lowers_the_loss(phantoms, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(phantoms, out, steps=30, lr=2e-3, save_every=10, keep_every=20,
                               validate_every=30, validate_cases=1, validate_steps=3, validate_ensemble=2,
                               prediction_type="epsilon"),
                   progress=False)
    records = read_jsonl(out / STEP_LOG)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(set(r) == {"step", "loss", "lr", "patches_per_s", "time"} for r in records)
    assert all(r["patches_per_s"] > 0 for r in records)
    times = [r["time"] for r in records]
    assert times == sorted(times)
    losses = [r["loss"] for r in records]
    # The network starts predicting zero noise (zero-initialised output layer): MSE ~ 1 against
    # unit Gaussian noise. Training must cut it well below that.
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert 0.8 < first < 1.2
    assert last < 0.6 * first, (first, last)
    assert result.last_loss == losses[-1] and not result.interrupted and result.steps == 30
    assert (result.checkpoint, sorted(p.name for p in out.glob("*.pt"))) == (out / LAST, ["last.pt", "step_0000020.pt"])
    assert not list(out.glob("*.tmp"))
    validation = read_jsonl(out / VALIDATION_LOG)
    assert len(validation) == 1 and validation[0]["step"] == 30
    assert 0.0 <= validation[0]["dice"] <= 1.0 and result.validation_dice == validation[0]["dice"]
    assert list(validation[0]["cases"]) == ["Phantom_005"] or len(validation[0]["cases"]) == 1


def test_checkpoint_contents(phantoms, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(phantoms, out, steps=3, save_every=100), progress=False)
    model, extra = read_training_checkpoint(out / LAST)
    assert (extra["step"], extra["samples_done"], extra["world_size"]) == (3, 6, 1)
    assert (extra["patch_shape"], extra["volume_shape"], extra["image_channels"]) == ([16] * 3, [24] * 3, 4)
    assert extra["train_config"]["lr"] == 1e-3 and extra["train_config"]["checkpoint"] == "off"
    assert extra["ema"]["updates"] == 3 and extra["scaler"] is None
    assert set(extra["rng"]) == {"torch", "cuda", "numpy", "python"}
    ema_model, info = load_trained_model(out / LAST)
    raw_model, raw_info = load_trained_model(out / LAST, ema=False)
    assert info.ema_weights and not raw_info.ema_weights and not ema_model.training
    assert info.volume_shape == (24, 24, 24) and info.patch_shape == (16, 16, 16)
    assert info.schedule.name == "linear" and info.schedule.num_timesteps == 1000
    assert info.step == 3 and math.isclose(info.last_loss, extra["last_loss"])
    for name, value in raw_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name])
    differs = [n for n, v in ema_model.state_dict().items() if not torch.equal(v, raw_model.state_dict()[n])]
    assert differs  # the average lags behind the trained weights


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision(phantoms, tmp_path, precision):
    # bf16 on 24^3 patches: PyTorch's CPU bf16 convolution weight gradients at 2^3 voxels (the
    # deepest level of a 16^3 patch) are sometimes NaN; from 3^3 up they are sound. fp16 has no
    # fast CPU convolution: the smallest patches.
    out = tmp_path / precision
    patch = 24 if precision == "bf16" else 16
    result = train(tiny_config(phantoms, out, steps=2, patch=patch, precision=precision, checkpoint="cheap",
                               channels_last=True), progress=False)
    assert result.steps == 2 and math.isfinite(result.last_loss)
    _, extra = read_training_checkpoint(out / LAST)
    assert extra["precision"] == precision
    assert (extra["scaler"] is not None) == (precision == "fp16")
    if precision == "fp16":
        assert extra["scaler"]["scale"] > 0


def test_auto_execution_is_resolved_recorded_and_said(phantoms, tmp_path, caplog):
    # precision and channels_last left to "auto": the run takes fast_settings' choice for its
    # device, records it resolved (what ran) and says so in one line. bf16 needs 24^3 patches
    # on the CPU (see test_reduced_precision).
    from patchddm_fast.fast_settings import fast_settings

    out = tmp_path / "auto"
    with caplog.at_level("INFO", logger="patchddm_fast"):
        result = train(tiny_config(phantoms, out, steps=1, patch=24, precision=None, channels_last=None),
                       progress=False)
    assert result.steps == 1 and math.isfinite(result.last_loss)
    expected = fast_settings("cpu")
    _, extra = read_training_checkpoint(out / LAST)
    assert extra["precision"] == expected.precision
    recorded = extra["train_config"]
    assert (recorded["precision"], recorded["channels_last"]) == (expected.precision, expected.channels_last)
    said = [r.getMessage() for r in caplog.records if "execution:" in r.getMessage()]
    assert len(said) == 1 and expected.precision in said[0]


def test_existing_run_is_never_overwritten(phantoms, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(phantoms, out, steps=1), progress=False)
    before = (out / LAST).read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(phantoms, out, steps=2), progress=False)
    assert (out / LAST).read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_config(phantoms, tmp_path / "empty", steps=2, resume=True), progress=False)
    with pytest.raises(ValueError, match="patch"):
        train(tiny_config(phantoms, out, steps=2, patch=8, resume=True), progress=False)


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(Exception, match="no such folder"):
        train(tiny_config(tmp_path / "nowhere", tmp_path / "out"), progress=False)


def test_non_finite_gradients_skip_the_update_then_stop_the_run(phantoms, tmp_path, monkeypatch):
    """Without loss scaling, a step whose gradients are not finite leaves the weights alone; five
    in a row end the run with a checkpoint of the last good state."""
    out = tmp_path / "run"
    train(tiny_config(phantoms, out, steps=1, save_every=100), progress=False)
    good, _ = read_training_checkpoint(out / LAST)
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads, *a, **k: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite gradients in 5 steps"):
        train(tiny_config(phantoms, out, steps=20, save_every=100, resume=True), progress=False)
    model, extra = read_training_checkpoint(out / LAST)
    assert extra["step"] == 5 and extra["ema"]["updates"] == 1
    for name, value in good.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert [r["step"] for r in read_jsonl(out / STEP_LOG)] == [1, 2, 3, 4, 5]



def test_x0_target_trains_and_is_recorded(phantoms, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(phantoms, out, steps=30, lr=2e-3, save_every=30, prediction_type="sample"),
                   progress=False)
    losses = [r["loss"] for r in read_jsonl(out / STEP_LOG)]
    # From a zero output the x0 loss is the tumour fraction of the patches; training must cut it.
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    _, info = load_trained_model(result.checkpoint)
    assert info.prediction_type == "sample"
    _, extra = read_training_checkpoint(result.checkpoint)
    assert extra["train_config"]["prediction_type"] == "sample"


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_the_loss_targets_what_the_prediction_type_names(prediction_type):
    schedule = NoiseSchedule.linear()
    mask = (torch.rand(2, 1, 4, 4, 4) > 0.7).float()
    model_input = torch.zeros(2, 8, 4, 4, 4)
    timesteps, seeds = torch.tensor([10, 900]), [5, 6]
    seen = {}

    def model(x, t):
        seen["x_t"] = x[:, 7:].clone()
        return torch.zeros_like(mask)

    loss = diffusion_loss(model, model_input, mask, schedule, timesteps=timesteps, seed=seeds,
                          prediction_type=prediction_type)
    noise = torch.cat([philox_normal((1, 1, 4, 4, 4), seed) for seed in seeds]).double()
    ab = schedule.alpha_bar(timesteps).view(-1, 1, 1, 1, 1)
    # float32 q_sample against float64: a few ulps of values below 5.
    torch.testing.assert_close(seen["x_t"].double(), ab.sqrt() * mask + (1 - ab).sqrt() * noise, rtol=0, atol=1e-5)
    target = {"epsilon": noise, "sample": mask.double(),
              "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * mask}[prediction_type]
    # A zero prediction: the loss is the target's mean square, float32 sums of 128 terms.
    assert float(loss) == pytest.approx(float((target ** 2).mean()), rel=1e-5)
