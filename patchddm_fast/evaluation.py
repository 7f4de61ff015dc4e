"""Scoring a folder of predicted masks against the ground truth: Dice and HD95 per case, and
their mean, standard deviation and median, as a table and as CSV.

Predictions (PRED_DIR, searched recursively): `<case_id>_mask.nii.gz` (or .nii), as
`patchddm sample` writes them; a folder without such files may instead hold one
`<case_id>.nii.gz` per case (nnU-Net's layout). Ground truth (GT_DIR, searched recursively): the
segmentation file of each case folder (BraTS's `<case_id>/<case_id>_seg.nii.gz`, or any name
patchddm_fast.data recognises as a segmentation), whose case id is its folder's name; or flat
files `<case_id>_seg.nii.gz` (or `<case_id>.nii.gz`) directly in GT_DIR.

Both are scored as the whole tumour (the region PatchDDM segments): a voxel is tumour when its
value is > 0 (integer files, e.g. BraTS labels 1, 2, 4) or > 0.5 (floating-point files). HD95
is in millimetres, with the voxel spacing of the ground truth's header; for empty masks see
patchddm_fast.metrics. Standard deviations are population ones (numpy's default, ddof=0).
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import CaseError, DataError
from .data.layout import nifti_stem, sequence_of
from .data.nifti import _data, _open
from ._files import atomic_write
from .metrics import dice, hd95

METRICS = ("dice", "hd95")
STATISTICS = ("mean", "std", "median")
_MASK_SUFFIX = re.compile(r"_mask$", re.IGNORECASE)
_OTHER_OUTPUTS = re.compile(r"_(mean|uncertainty)$", re.IGNORECASE)
_SEG_SUFFIX = re.compile(r"[_\-.](seg|segm|segmentation|label|labels|mask|gt|groundtruth)$", re.IGNORECASE)


@dataclass
class CaseScore:
    case_id: str
    dice: float = math.nan
    hd95: float = math.nan
    prediction: Path | None = None
    truth: Path | None = None
    error: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class FolderScores:
    """Scores of the cases of a prediction folder, and the case ids only one side has."""
    scores: list[CaseScore]
    predictions_without_truth: list[str] = field(default_factory=list)
    truths_without_prediction: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the whole evaluation (e.g. PRED_DIR is GT_DIR)

    @property
    def scored(self) -> list[CaseScore]:
        return [s for s in self.scores if s.ok]

    @property
    def failed(self) -> list[CaseScore]:
        return [s for s in self.scores if not s.ok]

    def summary(self) -> dict[str, dict[str, float]]:
        """{metric: {"mean", "std", "median"}} over the scored cases (NaN when there are none)."""
        return summarise({m: [getattr(s, m) for s in self.scored] for m in METRICS})


def summarise(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for metric, numbers in values.items():
        array = np.asarray(numbers, dtype=np.float64)
        if array.size == 0:
            out[metric] = {s: math.nan for s in STATISTICS}
        else:
            out[metric] = {"mean": float(array.mean()), "std": float(array.std()), "median": float(np.median(array))}
    return out


# -- finding the files ------------------------------------------------------------------------

def _nifti_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and nifti_stem(f)]
    return found


def _check_folder(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"{folder}: no such folder ({what})")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder ({what})")
    return folder


def _add(index: dict[str, Path], case_id: str, path: Path, notes: list[str]) -> None:
    if case_id in index:
        notes.append(f"{case_id}: two files, using {index[case_id]} and ignoring {path}")
    else:
        index[case_id] = path


def find_predictions(folder: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """{case_id: mask file} of a prediction folder (see the module docstring), and notes."""
    folder = _check_folder(folder, "predictions")
    files, index, notes = _nifti_files(folder), {}, []
    for path in files:
        stem = nifti_stem(path.name)
        if _MASK_SUFFIX.search(stem):
            _add(index, _MASK_SUFFIX.sub("", stem), path, notes)
    if not index:  # nnU-Net's layout: <case_id>.nii.gz
        for path in files:
            stem = nifti_stem(path.name)
            if not _OTHER_OUTPUTS.search(stem):
                _add(index, stem, path, notes)
    if not index:
        raise DataError(f"{folder}: holds no predicted masks (<case_id>_mask.nii.gz or <case_id>.nii.gz)")
    return index, notes


def find_truths(folder: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """{case_id: segmentation file} of a ground-truth folder (see the module docstring), and notes."""
    folder = _check_folder(folder, "ground truth")
    files, index, notes = _nifti_files(folder), {}, []
    for path in files:
        if sequence_of(path.name) != "seg":
            continue
        if path.parent != folder:
            case_id = path.parent.name
        else:
            case_id = _SEG_SUFFIX.sub("", nifti_stem(path.name))
        _add(index, case_id, path, notes)
    if not index:  # a flat folder of label maps, <case_id>.nii.gz
        for path in files:
            if path.parent == folder and sequence_of(path.name) is None:
                _add(index, nifti_stem(path.name), path, notes)
    if not index:
        raise DataError(f"{folder}: holds no segmentations (case folders with a <case_id>_seg.nii.gz, or "
                        "flat <case_id>_seg.nii.gz files)")
    return index, notes


# -- scoring ----------------------------------------------------------------------------------

def read_mask(path: Path, case_id: str):
    """(whole-tumour mask, image) of a label or mask file; raises CaseError naming the file."""
    image = _open(case_id, path)
    data = _data(case_id, path, image, None)
    mask = data > 0.5 if data.dtype.kind == "f" else data > 0
    return mask, image


def score_case(case_id: str, prediction: Path, truth: Path) -> CaseScore:
    """Dice and HD95 of one case; reading problems go into .error, never raise."""
    score = CaseScore(case_id, prediction=prediction, truth=truth)
    try:
        truth_mask, truth_image = read_mask(truth, case_id)
        predicted, predicted_image = read_mask(prediction, case_id)
    except CaseError as error:
        score.error = str(error).removeprefix(f"{case_id}: ")
        return score
    if predicted.shape != truth_mask.shape:
        score.error = (f"shapes differ: prediction {prediction.name} {predicted.shape}, ground truth "
                       f"{truth.name} {truth_mask.shape}")
        return score
    spacing = tuple(float(z) for z in truth_image.header.get_zooms()[:3])
    if not np.allclose(predicted_image.header.get_zooms()[:3], spacing, rtol=1e-3):
        score.warnings.append(f"voxel sizes differ (prediction {predicted_image.header.get_zooms()[:3]}, "
                              f"ground truth {spacing}); using the ground truth's")
    if not np.allclose(predicted_image.affine, truth_image.affine, atol=1e-3):
        score.warnings.append("the prediction's affine differs from the ground truth's")
    try:
        score.dice, score.hd95 = dice(predicted, truth_mask), hd95(predicted, truth_mask, spacing)
    except ValueError as error:  # e.g. a header with zero or negative voxel sizes
        score.error = f"cannot score: {error}"
    return score


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *,
                     progress: bool = False) -> FolderScores:
    """Scores every prediction that has a ground truth. Raises DataError when a folder is
    missing or no case has both."""
    predictions, notes = find_predictions(pred_dir)
    truths, truth_notes = find_truths(gt_dir)
    common = sorted(set(predictions) & set(truths))
    if not common:
        raise DataError(f"no case has both a prediction in {pred_dir} and a ground truth in {gt_dir} (predictions: "
                        f"{', '.join(sorted(predictions)[:5])}...; ground truth: {', '.join(sorted(truths)[:5])}...)")
    cases = common
    if progress:
        from tqdm import tqdm
        cases = tqdm(common, desc="evaluating", unit="case")
    scores = [score_case(c, predictions[c], truths[c]) for c in cases]
    warnings = _self_scoring_warnings(pred_dir, gt_dir, predictions, truths, scores)
    for note in notes + truth_notes:
        case_id = note.split(":", 1)[0]
        for s in scores:
            if s.case_id == case_id:
                s.warnings.append(note.split(": ", 1)[1])
    return FolderScores(scores, sorted(set(predictions) - set(truths)), sorted(set(truths) - set(predictions)),
                        warnings)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _self_scoring_warnings(pred_dir, gt_dir, predictions: dict, truths: dict, scores: list) -> list[str]:
    """Warnings when predictions are scored against themselves: PRED_DIR is GT_DIR, or a case's
    prediction is the very file of its ground truth (a Dice of 1 that means nothing)."""
    warnings = []
    if _same_file(pred_dir, gt_dir):
        warnings.append(f"PRED_DIR and GT_DIR are the same folder ({pred_dir}): the ground truth is scored against "
                        "itself, so Dice 1.0 means nothing")
    same = [s.case_id for s in scores if _same_file(predictions[s.case_id], truths[s.case_id])]
    for s in scores:
        if s.case_id in same:
            s.warnings.append("the prediction is the ground-truth file itself")
    if same and not warnings:
        warnings.append(f"{len(same)} prediction(s) are the very file of their ground truth "
                        f"({', '.join(same[:5])}{' ...' if len(same) > 5 else ''}): their Dice 1.0 means nothing")
    return warnings


# -- output -----------------------------------------------------------------------------------

def _number(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def format_table(evaluation: FolderScores) -> str:
    """The per-case scores and the summary as a plain-text table."""
    width = max([len("median")] + [len(s.case_id) for s in evaluation.scores])
    lines = [f"{'case':<{width}}  {'Dice':>7}  {'HD95 mm':>8}  note", "-" * (width + 30)]
    for s in evaluation.scores:
        note = f"FAILED: {s.error}" if s.error else "; ".join(s.warnings)
        lines.append(f"{s.case_id:<{width}}  {_number(s.dice, 4):>7}  {_number(s.hd95, 2):>8}  {note}".rstrip())
    lines.append("-" * (width + 30))
    summary = evaluation.summary()
    n = len(evaluation.scored)
    for statistic in STATISTICS:
        lines.append(f"{statistic:<{width}}  {_number(summary['dice'][statistic], 4):>7}  "
                     f"{_number(summary['hd95'][statistic], 2):>8}  {'over ' + str(n) + ' case(s)' if statistic == 'mean' else ''}".rstrip())
    return "\n".join(lines)


def write_csv(evaluation: FolderScores, path: str | os.PathLike) -> Path:
    """One row per case (case, dice, hd95_mm, error), then rows mean, std and median (as BraTS's
    evaluation CSVs end). Written atomically."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give the name of the CSV file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()

    def write(f):
        writer = csv.writer(f)
        writer.writerow(["case", "dice", "hd95_mm", "error"])
        for s in evaluation.scores:
            writer.writerow([s.case_id, _number(s.dice, 6), _number(s.hd95, 4), s.error])
        for statistic in STATISTICS:
            writer.writerow([statistic, _number(summary["dice"][statistic], 6),
                             _number(summary["hd95"][statistic], 4), ""])

    return atomic_write(path, write, newline="")


__all__ = ["CaseScore", "FolderScores", "evaluate_folders", "find_predictions", "find_truths", "format_table",
           "read_mask", "score_case", "summarise", "write_csv"]
