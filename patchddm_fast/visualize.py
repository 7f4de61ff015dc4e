"""Pictures people can look at: a per-case montage and the Figure-5 style sweep plot.

Both draw with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch),
so they work on headless machines and inside other people's programs, and both write their PNG
atomically (a temporary name, then os.replace).

Montage: three rows (axial, coronal and sagittal slices, each through the slice with the most
tumour in the prediction or the ground truth) and up to three columns: FLAIR with the predicted
mask, FLAIR with the ground truth (outlined in green, the prediction's outline in red over it),
and the uncertainty map (the ensemble's per-voxel standard deviation). Volumes are turned to
RAS orientation with the case's affine first, so every case is shown the same way whatever
its voxel order: left of the patient on the left of the picture, anterior and superior up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ._files import atomic_write

PRED_COLOUR = "#e8432e"
TRUTH_COLOUR = "#2ecc40"
_PRED_FILL = ListedColormap([PRED_COLOUR])
_TRUTH_FILL = ListedColormap([TRUTH_COLOUR])
VIEWS = ("axial", "coronal", "sagittal")
_FIXED_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # in RAS voxel order


def _save(figure: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    # through a hidden temporary file, removed if writing fails (a full disk, a read-only folder)
    return atomic_write(path, lambda f: figure.savefig(f, dpi=dpi, format="png"), mode="wb")


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The volume with its axes permuted and flipped so that they run to Right, Anterior, Superior."""
    orientation = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(np.asarray(volume), orientation)


def ras_spacing(affine: np.ndarray, shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) along each RAS axis of a volume of `shape` with this affine."""
    orientation = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(orientation, tuple(shape))
    return tuple(float(s) for s in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))


def tumour_slices(mask: np.ndarray) -> tuple[int, int, int]:
    """For each axis, the slice index holding the most mask voxels (the middle slice when the
    mask is empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)
    picks = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        picks.append(int(np.argmax(counts)))
    return tuple(picks)


def _slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """A 2-D slice of a RAS volume, transposed so that imshow(origin='lower') shows the first
    remaining axis horizontally and the second vertically."""
    axis = _FIXED_AXIS[view]
    return np.take(volume, index, axis=axis).T


def _aspect(spacing: Sequence[float], view: str) -> float:
    horizontal, vertical = [s for a, s in enumerate(spacing) if a != _FIXED_AXIS[view]]
    return vertical / horizontal


def _display_range(image: np.ndarray) -> tuple[float, float]:
    values = image[image != image.min()] if np.ptp(image) > 0 else image.ravel()
    if values.size == 0:
        return float(image.min()), float(image.max()) + 1e-6
    low, high = np.percentile(values, (1.0, 99.0))
    return float(low), float(max(high, low + 1e-6))


def _outline(axis, mask_slice: np.ndarray, colour: str) -> None:
    if mask_slice.any() and not mask_slice.all():  # contour needs both sides of the level
        axis.contour(mask_slice.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0, origin="lower")


def case_montage(path: str | os.PathLike, flair: np.ndarray, prediction: np.ndarray, uncertainty: np.ndarray,
                 affine: np.ndarray, *, truth: np.ndarray | None = None, title: str = "",
                 dpi: int = 100) -> Path:
    """Writes the montage of one case (see the module docstring) to `path` (PNG).

    flair: (X, Y, Z) image; prediction, truth: (X, Y, Z) masks (truth optional); uncertainty:
    (X, Y, Z) ensemble standard deviation; affine: the case's voxel-to-world matrix. All on the
    same grid (the case's original one).
    """
    shapes = {"flair": np.shape(flair), "prediction": np.shape(prediction), "uncertainty": np.shape(uncertainty)}
    if truth is not None:
        shapes["truth"] = np.shape(truth)
    if len(set(shapes.values())) != 1 or len(shapes["flair"]) != 3:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"case_montage: expected 3-D volumes of one shape, got {listed}")
    spacing = ras_spacing(affine, np.shape(flair))
    flair = to_ras(np.asarray(flair, dtype=np.float32), affine)
    prediction = to_ras(np.asarray(prediction) > 0, affine)
    uncertainty = to_ras(np.asarray(uncertainty, dtype=np.float32), affine)
    truth = to_ras(np.asarray(truth) > 0, affine) if truth is not None else None

    centre = tumour_slices(prediction | truth if truth is not None else prediction)
    columns = ["FLAIR + prediction"] + (["FLAIR + ground truth"] if truth is not None else []) + ["uncertainty"]
    low, high = _display_range(flair)
    top = max(float(uncertainty.max()), 1e-3)

    figure = Figure(figsize=(3.2 * len(columns) + 0.6, 3.0 * len(VIEWS) + (0.5 if title else 0.2)))
    grid = figure.add_gridspec(len(VIEWS), len(columns) + 1, width_ratios=[1] * len(columns) + [0.05])
    uncertainty_image = None
    for row, view in enumerate(VIEWS):
        index = centre[_FIXED_AXIS[view]]
        aspect = _aspect(spacing, view)
        image = _slice(flair, view, index)
        predicted = _slice(prediction, view, index)
        for column, name in enumerate(columns):
            axis = figure.add_subplot(grid[row, column])
            axis.set_xticks([])
            axis.set_yticks([])
            if name == "uncertainty":
                uncertainty_image = axis.imshow(_slice(uncertainty, view, index), cmap="inferno", vmin=0.0, vmax=top,
                                                origin="lower", aspect=aspect, interpolation="nearest")
            else:
                axis.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                            interpolation="nearest")
                if name == "FLAIR + prediction":
                    axis.imshow(np.ma.masked_where(~predicted, predicted), cmap=_PRED_FILL, alpha=0.45,
                                origin="lower", aspect=aspect, interpolation="nearest")
                else:
                    truth_slice = _slice(truth, view, index)
                    axis.imshow(np.ma.masked_where(~truth_slice, truth_slice), cmap=_TRUTH_FILL, alpha=0.35,
                                origin="lower", aspect=aspect, interpolation="nearest")
                    _outline(axis, truth_slice, TRUTH_COLOUR)
                    _outline(axis, predicted, PRED_COLOUR)
            if row == 0:
                axis.set_title(name, fontsize=10)
            if column == 0:
                axis.set_ylabel(f"{view} {index}", fontsize=9)
    colourbar_axis = figure.add_subplot(grid[:, -1])
    figure.colorbar(uncertainty_image, cax=colourbar_axis, label="ensemble std")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return _save(figure, path, dpi)


def sweep_plot(path: str | os.PathLike, summary: Sequence[Mapping], *, title: str = "", dpi: int = 110,
               scheduler: str = "ddim") -> Path:
    """Dice and HD95 against the number of sampling steps, one line per ensemble size, like
    Figure 5 of the PatchDDM paper.

    summary: one mapping per (steps, ensemble) with keys steps, ensemble, dice_mean, dice_std,
    hd95_mean, hd95_std (as patchddm_fast.sweep.summarise gives); the std is shown as a band.
    """
    if not summary:
        raise ValueError("sweep_plot: nothing to plot (the summary is empty)")
    missing = {"steps", "ensemble", "dice_mean", "dice_std", "hd95_mean", "hd95_std"} - set(summary[0])
    if missing:
        raise ValueError(f"sweep_plot: summary rows lack {sorted(missing)}")
    ensembles = sorted({int(r["ensemble"]) for r in summary})
    steps = sorted({int(r["steps"]) for r in summary})
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(ensembles), 2)))
    figure = Figure(figsize=(10.0, 4.0))
    axes = figure.subplots(1, 2)
    for axis, metric, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
        for colour, size in zip(colours, ensembles):
            rows = sorted((r for r in summary if int(r["ensemble"]) == size), key=lambda r: int(r["steps"]))
            x = np.array([int(r["steps"]) for r in rows], dtype=float)
            mean = np.array([float(r[f"{metric}_mean"]) for r in rows])
            std = np.array([float(r[f"{metric}_std"]) for r in rows])
            axis.plot(x, mean, marker="o", color=colour, label=f"ensemble {size}")
            if len(x) > 1 and np.all(np.isfinite(std)):
                axis.fill_between(x, mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
        if len(steps) > 1 and steps[-1] / max(steps[0], 1) >= 8:
            axis.set_xscale("log")
        axis.set_xticks(steps)
        axis.set_xticklabels([str(s) for s in steps])
        axis.minorticks_off()
        axis.set_xlabel(f"sampling steps ({ {'ddim': 'DDIM', 'ddpm': 'DDPM'}.get(scheduler, scheduler)})")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return _save(figure, path, dpi)
