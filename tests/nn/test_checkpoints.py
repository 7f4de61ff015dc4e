"""Our checkpoints (config stored with the weights) and the importer of original ones."""

import os

import pytest
import torch

from nn_helpers import TINY, inputs, randomize
from patchddm_fast.nn import (CheckpointMismatchError, UNet3D, UNetConfig, infer_config, load_checkpoint,
                              load_original_checkpoint, save_checkpoint)

CONFIG = UNetConfig(model_channels=4, channel_mult=(1, 3), num_res_blocks=2, in_channels=5, out_channels=2,
                    groups=2, dropout=0.1)


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = randomize(UNet3D(CONFIG))
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, step=1234, note="after warm-up", ema={"decay": torch.tensor(0.999)})
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind

    loaded, extra = load_checkpoint(path, fused=False, checkpoint="cheap")
    assert loaded.config == CONFIG and not loaded.training and not loaded.fused
    assert loaded.checkpoint_modes == ("cheap", "cheap")
    assert extra["step"] == 1234 and extra["note"] == "after warm-up"
    assert torch.equal(extra["ema"]["decay"], torch.tensor(0.999))
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    x, t, _ = inputs(CONFIG, size=4, batch=1)
    with torch.no_grad():
        # The same weights and inputs; a fresh module may take another convolution algorithm: float32
        # rounding in another order, a few ulps of outputs of order 1.
        assert torch.allclose(loaded(x, t), model.eval()(x, t), rtol=1e-5, atol=1e-6)


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(UNet3D(TINY), path, step=1)
    save_checkpoint(UNet3D(CONFIG), path, step=2)
    model, extra = load_checkpoint(path)
    assert model.config == CONFIG and extra["step"] == 2


def test_load_checkpoint_refuses_other_files(tmp_path):
    original = tmp_path / "savedmodel.pt"
    torch.save(UNet3D(TINY).state_dict(), original)
    with pytest.raises(CheckpointMismatchError, match="load_original_checkpoint"):
        load_checkpoint(original)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="garbage.pt"):
        load_checkpoint(garbage)


def _original_state(seed=0):
    return {k: v.clone() for k, v in randomize(UNet3D(CONFIG.replace(dropout=0.0)), seed).state_dict().items()}


@pytest.mark.parametrize("wrap", ["plain", "ddp", "wrapped", "compiled"])
def test_original_checkpoint_files_load(tmp_path, wrap):
    state = _original_state()
    saved = {"plain": state, "ddp": {"module." + k: v for k, v in state.items()},
             "wrapped": {"state_dict": state, "step": 5},
             "compiled": {"_orig_mod." + k: v for k, v in state.items()}}[wrap]
    path = tmp_path / "savedmodel100000.pt"
    torch.save(saved, path)
    model = load_original_checkpoint(path, groups=2)
    assert not model.training and model.config == CONFIG.replace(dropout=0.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_inferred_config():
    assert infer_config(_original_state(), groups=2) == CONFIG.replace(dropout=0.0)
    with pytest.raises(CheckpointMismatchError, match="groups=3 does not divide"):
        infer_config(_original_state(), groups=3)


def test_mismatches_are_named():
    state = _original_state()
    del state["input_blocks.1.0.in_layers.0.bias"]
    state["input_blocks.1.0.attention.qkv.weight"] = torch.zeros(3)
    state["middle_block.0.emb_layers.1.weight"] = torch.zeros(12, 15)
    with pytest.raises(CheckpointMismatchError) as info:
        load_original_checkpoint(state, groups=2)
    error = info.value
    assert error.missing == ["input_blocks.1.0.in_layers.0.bias"]
    assert error.unexpected == ["input_blocks.1.0.attention.qkv.weight"]
    assert error.mismatched == ["middle_block.0.emb_layers.1.weight: checkpoint (12, 15), model (12, 16)"]
    message = str(error)
    for text in ("missing (1): input_blocks.1.0.in_layers.0.bias",
                 "unexpected (1): input_blocks.1.0.attention.qkv.weight",
                 "mis-shaped (1): middle_block.0.emb_layers.1.weight: checkpoint (12, 15), model (12, 16)"):
        assert text in message


def test_architecture_keys_missing_or_nothing_to_load(tmp_path):
    state = _original_state()
    del state["time_embed.0.weight"]
    with pytest.raises(CheckpointMismatchError, match="missing key 'time_embed.0.weight'") as info:
        load_original_checkpoint(state)
    assert info.value.missing == ["time_embed.0.weight"]
    path = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"lr": 1e-4}}, path)
    with pytest.raises(CheckpointMismatchError, match="optimizer.pt: holds no state_dict"):
        load_original_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_original_checkpoint(tmp_path / "missing.pt")
