"""Small synthetic cases written to temporary folders for the data tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SEQS = ("t1", "t1ce", "t2", "flair")
AFFINE = np.array([[-1.0, 0, 0, 3.5], [0, -1.0, 0, 20.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])


def case_arrays(shape, seed: int):
    """Four sequences with a zero background and a distinct intensity scale each (so channel
    order can be checked), and a label map with BraTS labels in a block."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[tuple(slice(1, n - 1) for n in shape)] = True
    images = {}
    for k, seq in enumerate(SEQS):
        values = rng.uniform(100, 200, size=shape) * (k + 1)
        images[seq] = np.where(brain, values, 0).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    core = tuple(slice(n // 3, n // 3 + max(4, n // 2)) for n in shape)
    label[core] = 2
    inner = tuple(slice(s.start + 1, s.stop - 1) for s in core)
    label[inner] = 4
    label[tuple(slice(s.start + 1, s.start + 2) for s in inner)] = 1
    return images, label


def write_case(folder: Path, case_id: str, shape=(12, 10, 8), seed: int = 0, *, names: dict | None = None,
               skip=(), affine=AFFINE) -> Path:
    """Writes <folder>/<case_id>/<case_id>_<seq>.nii.gz (names overrides file names per sequence)."""
    case_dir = Path(folder) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    images, label = case_arrays(shape, seed)
    volumes = dict(images, seg=label)
    for kind, data in volumes.items():
        if kind in skip:
            continue
        name = (names or {}).get(kind, f"{case_id}_{kind}.nii.gz")
        image = nib.Nifti1Image(data, affine)
        image.header.set_zooms((1.0, 1.0, 2.0))
        nib.save(image, str(case_dir / name))
    return case_dir
