"""What `patchddm sample` writes per case, on the case's original grid with its affine and
header: mask, mean and uncertainty as NIfTI files, and a PNG montage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data import PreparedCase
from ..diffusion import SegmentationResult

OUTPUT_KINDS = ("mask", "mean", "uncertainty", "montage")
FLAIR = 3  # the image channel the montage shows


def output_path(output_dir: str | os.PathLike, case_id: str, kind: str) -> Path:
    """Where `patchddm sample` writes output `kind` (mask, mean, uncertainty, montage) of a case."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {OUTPUT_KINDS}")
    suffix = ".png" if kind == "montage" else ".nii.gz"
    return Path(output_dir) / f"{case_id}_{kind}{suffix}"


def truth_mask(prepared: PreparedCase) -> np.ndarray | None:
    """The whole-tumour ground truth on the original grid, or None without a segmentation."""
    if prepared.label is None:
        return None
    return prepared.meta.to_original(prepared.label.numpy()) > 0


def write_case_outputs(output_dir: str | os.PathLike, prepared: PreparedCase, result: SegmentationResult,
                       *, montage: bool = True) -> dict[str, Path]:
    """Writes mask, mean and uncertainty (and the montage) of one case; returns their paths."""
    meta, case_id = prepared.meta, prepared.case_id
    written = {
        "mask": meta.save(output_path(output_dir, case_id, "mask"), result.mask, dtype=np.uint8),
        "mean": meta.save(output_path(output_dir, case_id, "mean"), result.mean, dtype=np.float32),
        "uncertainty": meta.save(output_path(output_dir, case_id, "uncertainty"), result.std, dtype=np.float32),
    }
    if montage:
        from ..visualize import case_montage

        # FLAIR in the model's [-1, 1] range: the background (-1) stays black
        flair = meta.to_original(prepared.image[FLAIR].numpy(), fill=-1.0)
        written["montage"] = case_montage(
            output_path(output_dir, case_id, "montage"), flair, meta.to_original(result.mask.cpu().numpy()),
            meta.to_original(result.std.cpu().numpy()), meta.affine, truth=truth_mask(prepared),
            title=f"{case_id}: {len(result.seeds)} sample(s)")
    return written
