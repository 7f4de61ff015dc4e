"""Dice and HD95 against independent computations on hand-made masks."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchddm_fast.metrics import dice, grid_diagonal, hd95, region_scores, scores, surface_distances


def _surface_points(mask, spacing):
    """Voxels of the mask with a face neighbour outside it (outside the array counts), in mm."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    interior = inner.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & ~interior) * np.asarray(spacing, dtype=float)


def _brute_force_hd95(pred, target, spacing):
    a, b = _surface_points(pred, spacing), _surface_points(target, spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95))


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def test_dice_on_cubes():
    a = np.zeros((8, 8, 8), bool)
    b = a.copy()
    a[0:4, 0:4, 0:4] = True
    b[2:6, 0:4, 0:4] = True
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(torch.from_numpy(a), torch.from_numpy(b).to(torch.uint8)) == pytest.approx(0.5)


def test_hd95_of_single_voxels_with_spacing():
    a = np.zeros((6, 7, 3), bool)
    b = a.copy()
    a[1, 1, 1] = True
    b[4, 5, 1] = True
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing=(2, 1, 1)) == pytest.approx(math.sqrt(36 + 16))
    assert hd95(a, b, spacing=(1, 0.5, 7)) == pytest.approx(math.sqrt(9 + 4))


def test_hd95_of_shifted_cubes_with_anisotropic_spacing():
    a = np.zeros((12, 12, 16), bool)
    b = a.copy()
    a[2:8, 2:8, 2:8] = True
    b[2:8, 2:8, 5:11] = True  # the same cube 3 voxels further along the last axis
    for spacing in [(1, 1, 1), (1, 1, 2.5), (0.7, 1.3, 2.0)]:
        assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing))
    # The faces across the shift are 3 * 2.5 mm apart, the largest distance there is.
    forward, backward = surface_distances(a, b, (1, 1, 2.5))
    assert forward.max() == pytest.approx(7.5) and backward.max() == pytest.approx(7.5)


def test_hd95_of_concentric_spheres():
    outer, inner = _ball((40, 40, 40), (20, 20, 20), 12), _ball((40, 40, 40), (20, 20, 20), 7)
    value = hd95(outer, inner)
    assert value == pytest.approx(5.0, abs=1.0)  # radii differ by 5 voxels, up to voxelisation
    assert value == pytest.approx(_brute_force_hd95(outer, inner, (1, 1, 1)))
    assert hd95(outer, inner, spacing=(2, 2, 2)) == pytest.approx(2 * value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_of_random_blobs_touching_the_border(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 15, 12)
    pred = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.1
    target = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.1
    spacing = (1.0, 0.8, 2.2)
    assert pred[0].any() or pred[-1].any()  # the blobs reach the array's faces
    assert hd95(pred, target, spacing) == pytest.approx(_brute_force_hd95(pred, target, spacing))
    assert hd95(torch.from_numpy(pred), torch.from_numpy(target), spacing) == pytest.approx(hd95(pred, target, spacing))


def test_small_masks_in_a_large_grid_use_the_same_distances_as_the_full_grid():
    pred = np.zeros((64, 64, 64), bool)
    target = pred.copy()
    pred[30:36, 28:33, 40:44] = True
    target[33:40, 30:38, 38:45] = True
    target[33:35, 30:31, 38:39] = False
    assert hd95(pred, target, (1.2, 1, 0.9)) == pytest.approx(_brute_force_hd95(pred, target, (1.2, 1, 0.9)))


def test_empty_masks():
    empty = np.zeros((240, 240, 155), bool)
    full = empty.copy()
    full[100:110, 100:110, 70:80] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert hd95(full, empty) == pytest.approx(373.13, abs=0.01)  # BraTS's value
    assert hd95(empty, full) == hd95(full, empty)
    assert hd95(empty, full, spacing=(1, 1, 2)) == pytest.approx(grid_diagonal((240, 240, 155), (1, 1, 2)))
    assert hd95(empty, full, empty=math.inf) == math.inf
    assert scores(empty, empty) == {"dice": 1.0, "hd95": 0.0}


def test_bad_inputs():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="threshold it first"):
        hd95(a, np.full((4, 4, 4), 0.7))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1, 1))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1, 0, 1))


def test_region_scores():
    target = np.zeros((10, 10, 10), np.uint8)
    target[2:8, 2:8, 2:8] = 2
    target[3:7, 3:7, 3:7] = 4
    target[4:6, 4:6, 4:6] = 1
    pred = target.copy()
    pred[pred == 1] = 4  # necrosis called enhancing: WT and TC exact, ET not
    result = region_scores(pred, torch.from_numpy(target))
    assert result["WT"] == {"dice": 1.0, "hd95": 0.0}
    assert result["TC"] == {"dice": 1.0, "hd95": 0.0}
    et_pred, et_target = pred == 4, target == 4
    assert result["ET"]["dice"] == pytest.approx(dice(et_pred, et_target))
    assert result["ET"]["hd95"] == pytest.approx(_brute_force_hd95(et_pred, et_target, (1, 1, 1)))
    assert list(region_scores(pred, target, regions=("WT",))) == ["WT"]
    with pytest.raises(ValueError, match="unknown regions"):
        region_scores(pred, target, regions=("XX",))
