"""Scoring folders of predictions against ground truth (patchddm_fast.evaluation)."""

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from patchddm_fast.data import DataError
from patchddm_fast.evaluation import evaluate_folders, find_predictions, find_truths, format_table, write_csv

SHAPE = (12, 10, 8)
SPACING = (1.0, 1.5, 2.0)
AFFINE = np.diag([-1.0, -1.5, 2.0, 1.0])


def _save(path, data, spacing=SPACING, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = affine.copy()
    data = np.asarray(data)
    image = nib.Nifti1Image(data.astype(np.uint8) if data.dtype == bool else data, affine)
    image.header.set_zooms(spacing)
    nib.save(image, str(path))
    return path


def _cube(lo, hi, shape=SHAPE, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return mask


def _hd95_by_hand(a, b, spacing):
    """Pairwise distances between the surface voxels (6-neighbourhood) of two masks."""
    def surface(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m, bool)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1].astype(bool)
        return np.argwhere(m & ~inner) * np.asarray(spacing)
    sa, sb = surface(a.astype(bool)), surface(b.astype(bool))
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.fixture
def folders(tmp_path):
    """Ground truth in BraTS's layout (labels 1, 2, 4) and predictions as `patchddm sample` names them."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    truth = {"A": _cube((2, 2, 2), (8, 7, 6), value=2), "B": _cube((3, 3, 1), (9, 8, 5), value=4),
             "C": _cube((1, 1, 1), (5, 5, 5), value=1)}
    truth["A"][4:6, 4:6, 3:5] = 1  # a core inside the oedema: still whole tumour
    for case, label in truth.items():
        _save(gt / f"Case_{case}" / f"Case_{case}_seg.nii.gz", label)
        _save(gt / f"Case_{case}" / f"Case_{case}_flair.nii.gz", np.ones(SHAPE, np.float32))
    shifted = _cube((3, 2, 2), (9, 7, 6))
    _save(pred / "Case_A_mask.nii.gz", shifted)
    _save(pred / "Case_A_mean.nii.gz", shifted.astype(np.float32))  # not a mask: ignored
    _save(pred / "Case_B_mask.nii.gz", truth["B"] > 0)
    _save(pred / "Case_C_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(pred / "Case_D_mask.nii.gz", np.zeros(SHAPE, np.uint8))  # no ground truth
    return pred, gt, truth, shifted


def test_scores_match_independent_computation(folders):
    pred, gt, truth, shifted = folders
    evaluation = evaluate_folders(pred, gt)
    scores = {s.case_id: s for s in evaluation.scores}
    assert sorted(scores) == ["Case_A", "Case_B", "Case_C"]
    assert evaluation.predictions_without_truth == ["Case_D"]
    a_truth = truth["A"] > 0
    expected_dice = 2 * np.logical_and(shifted > 0, a_truth).sum() / ((shifted > 0).sum() + a_truth.sum())
    assert scores["Case_A"].dice == pytest.approx(expected_dice)
    assert scores["Case_A"].hd95 == pytest.approx(_hd95_by_hand(shifted, a_truth, SPACING))
    assert scores["Case_B"].dice == 1.0 and scores["Case_B"].hd95 == 0.0
    # empty prediction: Dice 0 and the grid's diagonal in mm (BraTS's convention)
    assert scores["Case_C"].dice == 0.0
    assert scores["Case_C"].hd95 == pytest.approx(math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING))))
    summary = evaluation.summary()
    dices = [scores[c].dice for c in ("Case_A", "Case_B", "Case_C")]
    assert summary["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert summary["dice"]["std"] == pytest.approx(np.std(dices))
    assert summary["dice"]["median"] == pytest.approx(np.median(dices))


def test_bad_files_become_case_errors(folders):
    pred, gt, _, _ = folders
    (pred / "Case_B_mask.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _save(pred / "Case_C_mask.nii.gz", np.zeros((4, 4, 4), np.uint8))
    evaluation = evaluate_folders(pred, gt)
    errors = {s.case_id: s.error for s in evaluation.failed}
    assert "Case_B_mask.nii.gz" in errors["Case_B"]
    assert "shapes differ" in errors["Case_C"] and "(4, 4, 4)" in errors["Case_C"]
    assert [s.case_id for s in evaluation.scored] == ["Case_A"]
    table = format_table(evaluation)
    assert "FAILED" in table and "over 1 case(s)" in table


def test_csv_has_cases_then_summary(folders, tmp_path):
    pred, gt, _, _ = folders
    evaluation = evaluate_folders(pred, gt)
    path = write_csv(evaluation, tmp_path / "out" / "scores.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["case"] for r in rows] == ["Case_A", "Case_B", "Case_C", "mean", "std", "median"]
    assert float(rows[1]["dice"]) == 1.0
    assert float(rows[3]["dice"]) == pytest.approx(evaluation.summary()["dice"]["mean"], abs=1e-6)


def test_other_layouts(tmp_path):
    """Flat ground truth (<case>_seg.nii.gz), nnU-Net-style predictions (<case>.nii.gz), float files."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    label = _cube((2, 2, 2), (6, 6, 6), value=2)
    _save(gt / "P1_seg.nii.gz", label.astype(np.float32))
    _save(gt / "P2_seg.nii.gz", label)
    _save(pred / "P1.nii.gz", np.where(label > 0, 0.9, 0.1).astype(np.float32))  # float: > 0.5 is tumour
    _save(pred / "P2.nii.gz", label)
    _save(pred / "P2_uncertainty.nii.gz", np.zeros(SHAPE, np.float32))
    assert sorted(find_truths(gt)[0]) == ["P1", "P2"]
    assert sorted(find_predictions(pred)[0]) == ["P1", "P2"]
    evaluation = evaluate_folders(pred, gt)
    assert [s.dice for s in evaluation.scores] == [1.0, 1.0]


def test_folder_problems_raise(tmp_path, folders):
    pred, gt, _, _ = folders
    with pytest.raises(DataError, match="no such folder"):
        evaluate_folders(tmp_path / "missing", gt)
    other = tmp_path / "other"
    _save(other / "Zed_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match="no case has both"):
        evaluate_folders(other, gt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no predicted masks"):
        evaluate_folders(empty, gt)
