"""An original PatchDDM checkpoint, imported with `patchddm import-checkpoint`, goes through
every reader of checkpoints: `patchddm sample`, `patchddm sweep` and the trainer's validation."""

import math
import os

from patchddm_fast.checkpoint_info import CheckpointInfo
from patchddm_fast.cli import main
from patchddm_fast.data import find_cases, write_phantoms
from patchddm_fast.inference import load_model, output_path
from patchddm_fast.nn import load_checkpoint
from patchddm_fast.train import evaluate_checkpoint, load_trained_model

SHAPE = (16, 16, 16)  # a multiple of the golden small network's 2^3


def test_imported_original_checkpoint_samples_sweeps_and_validates(golden_dir, tmp_path):
    data = tmp_path / "data"
    write_phantoms(data, n=2, shape=SHAPE, seed=4)
    cases, _ = find_cases(data)
    imported = tmp_path / "imported.pt"
    original = os.path.join(golden_dir, "reference_unet_small.npz")
    assert main(["import-checkpoint", original, str(imported), "--volume", "16", "--patch", "16", "-q"]) == 0

    # the format the trainer writes: one CheckpointInfo, read back by every loader
    _, extra = load_checkpoint(imported)
    info = CheckpointInfo.from_dict(extra)
    assert info.to_dict() == {k: v for k, v in extra.items() if k in info.to_dict()}
    assert (info.volume_shape, info.patch_shape, info.image_channels) == (SHAPE, SHAPE, 4)
    _, loaded_info = load_trained_model(imported)
    assert loaded_info.schedule.to_dict() == {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                              "beta_end": 0.02}
    assert loaded_info.step is None and not loaded_info.ema_weights
    assert load_model(imported).volume_shape == SHAPE

    common = ["--steps", "2", "--ensemble", "1", "--seed", "0", "--device", "cpu", "-q"]
    assert main(["sample", str(imported), str(data), str(tmp_path / "pred"), "--no-montage", *common]) == 0
    for case in cases:
        assert output_path(tmp_path / "pred", case.case_id, "mask").is_file()

    sweep = tmp_path / "sweep"
    assert main(["sweep", str(imported), str(data), str(sweep), "--steps", "1", "2", "--ensemble", "1",
                 "--seed", "0", "--device", "cpu", "-q"]) == 0
    assert (sweep / "sweep_cases.csv").is_file() and (sweep / "sweep_summary.csv").is_file()

    scores = evaluate_checkpoint(imported, cases, steps=2, ensemble=1)
    assert sorted(scores.cases) == sorted(c.case_id for c in cases)
    assert all(0.0 <= d <= 1.0 for d in scores.cases.values())
    assert math.isfinite(scores.mean_dice)
