"""Segmentation metrics: Dice and HD95, for binary masks and per BraTS region.

Dice = 2 |P & T| / (|P| + |T|).

HD95 is the 95th percentile (numpy's linear interpolation) of the symmetric surface distances,
in millimetres: the distances from every surface voxel of the prediction to the nearest surface
voxel of the target, pooled with those from every target surface voxel to the nearest
prediction surface voxel (the definition of medpy's hd95). A surface voxel is a mask voxel
with at least one of its 6 face neighbours outside the mask (outside the array counts as
outside). Distances come from Euclidean distance transforms with the voxel spacing
(scipy.ndimage.distance_transform_edt), computed only in the bounding box of both masks,
which gives the same distances as the whole grid at a fraction of the cost.

Empty masks, as the BraTS evaluation scores them:
  both empty:  Dice 1, HD95 0;
  one empty:   Dice 0, HD95 = the diagonal of the grid in mm, sqrt(sum((n_k * spacing_k)^2)),
               which on BraTS's 240 x 240 x 155 grid of 1 mm is BraTS's 373.13 (so evaluate
               on the original grid, not the padded one, to match BraTS). Pass `empty=math.inf`
               for the mathematical convention instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from .data.regions import REGIONS, brats_regions


def _as_mask(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype != np.bool_:
        if not np.all((array == 0) | (array == 1)):
            raise ValueError(f"{name} must be a boolean mask (or hold only 0 and 1); threshold it first")
        array = array.astype(bool)
    return array


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_mask("pred", pred), _as_mask("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}")
    return pred, target


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(s > 0 and math.isfinite(s) for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm per voxel), got {tuple(spacing)}")
    return values


def dice(pred, target) -> float:
    """Dice overlap of two boolean masks (numpy arrays or tensors); 1.0 when both are empty."""
    pred, target = _pair(pred, target)
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def grid_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a grid: BraTS's HD95 when exactly one mask is empty."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, target, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """(distances from pred's surface voxels to target's surface, and from target's to pred's),
    in mm. Both masks must be non-empty."""
    pred, target = _pair(pred, target)
    spacing = _spacing(spacing, pred.ndim)
    union = pred | target
    if not pred.any() or not target.any():
        raise ValueError("surface_distances needs two non-empty masks")
    # Both masks lie in the union's bounding box, so cropping to it changes no surface voxel
    # (beyond its faces there is no mask) and no nearest-surface distance.
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    pred_surface, target_surface = _surface(pred[box]), _surface(target[box])
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_target[pred_surface], to_pred[target_surface]


def hd95(pred, target, spacing=(1.0, 1.0, 1.0), *, empty: float | None = None) -> float:
    """95th percentile of the symmetric surface distances in mm (see the module docstring).
    0 when both masks are empty; `empty` (default: the grid's diagonal, as BraTS) when one is."""
    pred, target = _pair(pred, target)
    spacing = _spacing(spacing, pred.ndim)
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return 0.0
    if not has_pred or not has_target:
        return grid_diagonal(pred.shape, spacing) if empty is None else float(empty)
    forward, backward = surface_distances(pred, target, spacing)
    return float(np.percentile(np.concatenate([forward, backward]), 95))


def scores(pred, target, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """{"dice": ..., "hd95": ...} of two boolean masks."""
    return {"dice": dice(pred, target), "hd95": hd95(pred, target, spacing)}


def region_scores(pred_label, target_label, spacing=(1.0, 1.0, 1.0), regions: Sequence[str] = REGIONS) -> dict:
    """{region: {"dice", "hd95"}} of two BraTS label maps (labels 0, 1, 2, 4) for the regions
    WT (label > 0), TC (1 or 4) and ET (4). A whole-tumour-only prediction is scored with
    regions=("WT",)."""
    if isinstance(pred_label, torch.Tensor):
        pred_label = pred_label.detach().cpu().numpy()
    if isinstance(target_label, torch.Tensor):
        target_label = target_label.detach().cpu().numpy()
    unknown = set(regions) - set(REGIONS)
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}; the BraTS regions are {REGIONS}")
    pred_regions, target_regions = brats_regions(np.asarray(pred_label)), brats_regions(np.asarray(target_label))
    return {name: scores(pred_regions[name], target_regions[name], spacing) for name in regions}
