"""The per-case montage and the sweep plot (patchddm_fast.visualize)."""

import matplotlib.image
import numpy as np
import pytest

from patchddm_fast.visualize import case_montage, ras_spacing, sweep_plot, to_ras, tumour_slices

SHAPE = (20, 18, 12)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    flair = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
    truth = np.zeros(SHAPE, bool)
    truth[6:12, 5:11, 3:8] = True
    prediction = np.zeros(SHAPE, bool)
    prediction[7:13, 5:11, 3:8] = True
    uncertainty = np.where(prediction ^ truth, 0.4, 0.0).astype(np.float32)
    return flair, prediction, uncertainty, truth


def _red_pixels(png) -> int:
    rgb = png[..., :3]
    return int(((rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.45) & (rgb[..., 2] < 0.45)).sum())


def test_montage_is_a_valid_png_showing_the_prediction(tmp_path):
    flair, prediction, uncertainty, truth = _case()
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])  # BraTS-like flips, anisotropic voxels
    with_truth = case_montage(tmp_path / "t.png", flair, prediction, uncertainty, affine, truth=truth, title="case")
    shown = case_montage(tmp_path / "p.png", flair, prediction, uncertainty, affine)
    empty = case_montage(tmp_path / "e.png", flair, np.zeros(SHAPE, bool), uncertainty, affine)
    t, p, e = (matplotlib.image.imread(path) for path in (with_truth, shown, empty))
    assert p.ndim == 3 and p.shape[2] in (3, 4) and p.shape[0] > 200
    # three columns with the ground truth, two without: the picture is wider
    assert t.shape[1] > p.shape[1] and p.shape == e.shape
    # the prediction overlay is red: the same montage with an empty prediction has far less red
    # (what red remains is the uncertainty colour bar's, identical in both)
    assert _red_pixels(p) > _red_pixels(e) + 200
    assert not list(tmp_path.glob(".*partial*"))


def test_montage_rejects_mismatched_volumes(tmp_path):
    flair, prediction, uncertainty, truth = _case()
    with pytest.raises(ValueError, match="one shape"):
        case_montage(tmp_path / "x.png", flair, prediction[:-1], uncertainty, np.eye(4), truth=truth)
    assert not (tmp_path / "x.png").exists()


def test_tumour_slices_pick_the_largest_cross_section():
    mask = np.zeros((10, 10, 10), bool)
    mask[2, 1:9, 1:9] = True  # a large plane at x = 2
    mask[6:8, 4, 4] = True
    assert tumour_slices(mask) == (2, 4, 4)
    assert tumour_slices(np.zeros((10, 8, 6), bool)) == (5, 4, 3)


def test_to_ras_undoes_flips_and_permutations():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0])  # x and y run to Left and Posterior
    np.testing.assert_array_equal(to_ras(volume, flipped), volume[::-1, ::-1, :])
    # voxel axes (z, x, y) with 3, 1, 2 mm voxels: RAS order is the file's axes (1, 2, 0)
    permuted = np.zeros((4, 4))
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 3.0, 1.0, 2.0, 1.0
    np.testing.assert_array_equal(to_ras(volume, permuted), volume.transpose(1, 2, 0))
    assert ras_spacing(permuted, volume.shape) == (1.0, 2.0, 3.0)


def test_sweep_plot(tmp_path):
    summary = [dict(steps=s, ensemble=e, dice_mean=0.5 + 0.01 * s + 0.02 * e, dice_std=0.05, hd95_mean=20.0 / s,
                    hd95_std=1.0) for s in (2, 5, 10, 20) for e in (1, 3, 5)]
    png = matplotlib.image.imread(sweep_plot(tmp_path / "sweep.png", summary, title="t"))
    assert png.ndim == 3 and png.shape[1] > png.shape[0] > 100
    with pytest.raises(ValueError, match="empty"):
        sweep_plot(tmp_path / "e.png", [])
    with pytest.raises(ValueError, match="hd95_mean"):
        sweep_plot(tmp_path / "m.png", [dict(steps=1, ensemble=1, dice_mean=1, dice_std=0, hd95_std=0)])
