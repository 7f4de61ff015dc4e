"""Reading trained models: clear errors for files that are not ours, our own format otherwise."""

import pytest
import torch

from patchddm_fast.checkpoint_info import CheckpointInfo
from patchddm_fast.diffusion import NoiseSchedule
from patchddm_fast.nn import CheckpointMismatchError, UNet3D, save_checkpoint
from patchddm_fast.nn.config import SMALL
from patchddm_fast.train import load_trained_model, read_training_checkpoint
from patchddm_fast.train.checkpoints import restore_rng_states, rng_states
from patchddm_fast.train.trainer import data_volume_edge


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_trained_model(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointMismatchError, match="notes.pt"):
        load_trained_model(text)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointMismatchError, match="not a patchddm_fast"):
        load_trained_model(plain)


def test_network_checkpoint_without_training_state(tmp_path):
    """An imported or exported network loads, with what is unknown left None; it cannot be resumed."""
    path = tmp_path / "net.pt"
    save_checkpoint(UNet3D(SMALL), path)
    model, info = load_trained_model(path)
    assert model.config == SMALL and not model.training
    assert info.volume_shape is None and info.step is None and not info.ema_weights
    assert info.schedule.name == "linear" and info.image_channels == 4
    with pytest.raises(CheckpointMismatchError, match="without training state"):
        read_training_checkpoint(path)


def test_checkpoints_of_the_earlier_trainer_format_load(tmp_path):
    """The trainer used to record the shapes under extra["shapes"]; such checkpoints still load."""
    path = tmp_path / "old.pt"
    schedule = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    save_checkpoint(UNet3D(SMALL), path, kind="patchddm_fast.train", version=1, step=7, schedule=schedule,
                    shapes={"patch": [32] * 3, "volume": [64] * 3, "image_channels": 4}, precision="fp32",
                    last_loss=0.5, ema=None)
    _, info = load_trained_model(path)
    assert (info.volume_shape, info.patch_shape, info.image_channels) == ((64,) * 3, (32,) * 3, 4)
    assert info.step == 7 and info.precision == "fp32" and info.schedule.to_dict() == schedule


def test_checkpoint_info_round_trip():
    info = CheckpointInfo(NoiseSchedule.cosine(50), volume_shape=(64, 64, 48), patch_shape=(32, 32, 32),
                          image_channels=4, step=3, precision="bf16", last_loss=0.25, train_config={"seed": 1})
    again = CheckpointInfo.from_dict(info.to_dict())
    assert again == info and again.schedule.to_dict() == info.schedule.to_dict()
    assert torch.equal(again.schedule.betas, info.schedule.betas)
    with pytest.raises(CheckpointMismatchError, match="noise schedule"):
        CheckpointInfo.from_dict({"schedule": {"name": "quadratic"}})


def test_rng_states_round_trip():
    import random

    import numpy as np

    states = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng_states(states)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class FakeCase:
    def __init__(self, path):
        self.files = {"t1": path}


@pytest.mark.parametrize("shape, multiple, edge", [((240, 240, 155), 64, 256), ((24, 24, 24), 8, 32),
                                                   ((48, 40, 33), 8, 48), ((64, 64, 64), 64, 64)])
def test_volume_edge_from_the_data(tmp_path, shape, multiple, edge):
    import nibabel as nib
    import numpy as np

    path = tmp_path / "t1.nii"
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), path)
    header = nib.load(path).header
    header.set_data_shape(shape)  # only the header is read
    with open(path, "r+b") as f:
        f.write(header.binaryblock)
    assert data_volume_edge([FakeCase(tmp_path / "missing.nii"), FakeCase(path)], multiple) == edge
