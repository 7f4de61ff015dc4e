"""Our U-Net against the original PatchDDM implementation (golden data in tests/golden)."""

import json
import os

import numpy as np
import pytest
import torch

from patchddm_fast.nn import UNetConfig, load_original_checkpoint, paper_unet



@pytest.fixture
def small_npz(golden_dir):
    return os.path.join(golden_dir, "reference_unet_small.npz")


@pytest.fixture
def paper_shapes(golden_dir):
    with open(os.path.join(golden_dir, "reference_unet_paper_config_shapes.json")) as f:
        return json.load(f)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "baseline"])
def test_golden_forward_of_the_imported_small_model(small_npz, fused):
    golden = np.load(small_npz)
    model = load_original_checkpoint(small_npz, fused=fused)
    assert not model.training
    assert model.config == UNetConfig(
        model_channels=int(golden["config_model_channels"]), channel_mult=tuple(golden["config_channel_mult"]),
        num_res_blocks=int(golden["config_num_res_blocks"]), in_channels=int(golden["config_in_channels"]),
        out_channels=int(golden["config_out_channels"]))
    with torch.no_grad():
        out = model(torch.from_numpy(golden["input"]), torch.from_numpy(golden["timesteps"]))
    assert out.shape == golden["output"].shape
    # The original's forward differs by 7.7e-7 from one CPU to another (tests/golden/README.md):
    # 1e-4 leaves two orders of magnitude for other convolution kernels, while a mapping or
    # architecture mistake is of order 1.
    assert relative_error(out, torch.from_numpy(golden["output"])) < 1e-4


def test_paper_preset_matches_the_original_config(paper_shapes):
    reference = paper_shapes
    model = paper_unet()
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"] == 24_260_299
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in reference["state_dict_shapes"].items()}


def test_importer_maps_every_key_of_the_paper_config(paper_shapes):
    shapes = paper_shapes["state_dict_shapes"]
    assert len(shapes) == 412
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v, generator=generator) for k, v in shapes.items()}
    model = load_original_checkpoint({"module." + k: v for k, v in state.items()})  # as DDP saves it
    config = model.config
    assert (config.model_channels, config.channel_mult, config.num_res_blocks, config.in_channels,
            config.out_channels, config.groups) == (29, (1, 3, 4, 4, 4, 4, 4), 2, 8, 1, 29)
    ours = model.state_dict()
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key
