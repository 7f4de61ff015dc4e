"""The score a model must beat: one threshold on the normalised FLAIR.

Whole tumour (oedema included) is bright in FLAIR, so a single intensity threshold is the
simplest segmenter there is. FlairThreshold.fit tunes it for mean Dice on training cases;
score() applies it to other cases. Reported beside a model's Dice, it shows at once whether a
data set is too easy (the threshold already scores high) or a model too weak (below it).

The FLAIR is normalised per case as the model's input is (percentiles of the non-zero voxels,
patchddm_fast.data.normalise_sequence), so the threshold transfers between cases; the
largest connected component of the thresholded mask is kept (scattered bright voxels are
rarely tumour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .data.nifti import load_case
from .data.preprocess import normalise_sequence
from .data.layout import SEQUENCES, CaseFiles
from .metrics import dice

_FLAIR = SEQUENCES.index("flair")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (all False when empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _flair_and_truth(case: CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    if not case.has_label:
        raise ValueError(f"{case.case_id}: the FLAIR baseline needs the case's segmentation")
    raw = load_case(case)
    return normalise_sequence(raw.images[_FLAIR]), raw.label > 0


@dataclass(frozen=True)
class FlairThreshold:
    """mask = largest_component(normalised FLAIR > threshold)."""

    threshold: float
    keep_largest: bool = True

    def segment(self, flair_unit: np.ndarray) -> np.ndarray:
        mask = flair_unit > self.threshold
        return largest_component(mask) if self.keep_largest else mask

    @classmethod
    def fit(cls, cases: Sequence[CaseFiles], *, keep_largest: bool = True,
            candidates: Sequence[float] = tuple(np.round(np.arange(0.30, 0.951, 0.01), 2))) -> "FlairThreshold":
        """The candidate threshold with the best mean Dice on `cases` (with segmentations)."""
        if not cases:
            raise ValueError("FlairThreshold.fit needs at least one case with a segmentation")
        data = [_flair_and_truth(case) for case in cases]
        best, best_score = None, -1.0
        for value in candidates:
            rule = cls(float(value), keep_largest)
            score = float(np.mean([dice(rule.segment(flair), truth) for flair, truth in data]))
            if score > best_score:
                best, best_score = rule, score
        return best

    def score(self, cases: Sequence[CaseFiles]) -> dict[str, float]:
        """Dice per case id on `cases` (with segmentations), on each case's own grid."""
        result = {}
        for case in cases:
            flair, truth = _flair_and_truth(case)
            result[case.case_id] = dice(self.segment(flair), truth)
        return result


__all__ = ["FlairThreshold", "baseline_for", "format_comparison", "largest_component"]


def baseline_for(data_dir, case_ids: Sequence[str]) -> tuple[FlairThreshold, dict[str, float]]:
    """The FLAIR threshold fitted on the training part of data_dir's split (never on the
    cases scored), and its Dice on the cases named by case_ids. Raises ValueError when the
    folder holds no training case with images and a segmentation."""
    from .data import find_cases, subset_cases

    cases, _ = find_cases(data_dir, with_label=True)
    wanted = set(case_ids)
    training = [c for c in subset_cases(cases, "train") if c.case_id not in wanted]
    if not training:
        raise ValueError(f"{data_dir}: no training case (images and segmentation) to fit the FLAIR baseline on")
    rule = FlairThreshold.fit(training)
    return rule, rule.score([c for c in cases if c.case_id in wanted])


def format_comparison(model: dict[str, float], baseline: dict[str, float], threshold: float) -> str:
    """Per case, the model's Dice beside the FLAIR threshold's, and both means."""
    ids = [c for c in model if c in baseline]
    width = max([len("mean")] + [len(c) for c in ids])
    lines = [f"{'case':<{width}}  {'model':>6}  {'FLAIR>' + format(threshold, '.2f'):>10}",
             "-" * (width + 20)]
    lines += [f"{c:<{width}}  {model[c]:6.4f}  {baseline[c]:10.4f}" for c in ids]
    if ids:
        lines += ["-" * (width + 20),
                  f"{'mean':<{width}}  {np.mean([model[c] for c in ids]):6.4f}  "
                  f"{np.mean([baseline[c] for c in ids]):10.4f}"]
    return "\n".join(lines)
