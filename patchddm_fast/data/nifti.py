"""Reading one case's NIfTI files (lazily: nothing is read before a case is asked for) and
writing outputs with a case's own affine and header.

Every failure to read a case becomes a CaseError naming the case and the file, so a caller can
report it and go on with the other cases.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .layout import LABEL, SEQUENCES, CaseError, CaseFiles

BRATS_LABELS = (0, 1, 2, 4)  # background, necrotic/non-enhancing core, oedema, enhancing tumour


@dataclass
class RawCase:
    """One case as stored: images (4, X, Y, Z) float32 in t1, t1ce, t2, flair order; label
    (X, Y, Z) uint8 BraTS labels or None; the affine and header of the t1 file."""

    case_id: str
    images: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def _open(case_id: str, path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(os.fspath(path))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CaseError(case_id, f"cannot read {path.name} ({type(exc).__name__}: {exc})", path) from None
    if len(image.shape) > 3 and any(n != 1 for n in image.shape[3:]):
        raise CaseError(case_id, f"{path.name} is not a 3-D volume (shape {image.shape})", path)
    if len(image.shape) < 3:
        raise CaseError(case_id, f"{path.name} is not a 3-D volume (shape {image.shape})", path)
    return image


def _data(case_id: str, path: Path, image: nib.Nifti1Image, dtype) -> np.ndarray:
    """The voxels as `dtype` (scaled by the header's slope and intercept), or in the stored
    integer type when dtype is None and the file holds unscaled integers (labels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(image.dataobj) if dtype is None else image.get_fdata(dtype=dtype)
    except Exception as exc:  # truncated gzip (EOFError), bad zlib stream, short file (OSError) ...
        raise CaseError(case_id, f"cannot read the data of {path.name} ({type(exc).__name__}: {exc})", path) from None
    data = data.reshape(data.shape[:3])  # drops trailing singleton dimensions
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise CaseError(case_id, f"{path.name} holds NaN or infinite values", path)
    return data


def _as_labels(case_id: str, path: Path, data: np.ndarray, notes: list[str]) -> np.ndarray:
    if data.dtype.kind != "f":
        rounded = data
    else:  # resampled segmentations come as floats, sometimes a hair off the integers
        rounded = np.rint(data)
        if np.any(np.abs(rounded - data) > 1e-3):
            notes.append(f"{path.name} holds non-integer values; rounded to the nearest label")
    low, high = rounded.min(), rounded.max()
    if low < 0 or high > 255:
        raise CaseError(case_id, f"{path.name} is not a label map (values from {low} to {high})", path)
    labels = rounded.astype(np.uint8, copy=False)
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    unexpected = sorted(set(present.tolist()) - set(BRATS_LABELS))
    if unexpected:
        notes.append(f"{path.name} holds labels {unexpected} besides BraTS's {list(BRATS_LABELS)}; "
                     "they count as tumour (label > 0)")
    return labels


def load_case(case: CaseFiles, *, with_label: bool = True) -> RawCase:
    """Reads a case's four sequences (and its segmentation when with_label).

    Raises CaseError for a missing or unreadable file, a file that is not 3-D, NaNs, or shapes
    that differ between the files. Affines that differ are a warning (kept in .warnings).
    """
    missing = case.missing(with_label)
    if missing:
        raise CaseError(case.case_id, f"missing {', '.join(missing)} in {case.folder}")
    kinds = SEQUENCES + ((LABEL,) if with_label else ())
    opened = {kind: _open(case.case_id, case.files[kind]) for kind in kinds}
    shapes = {kind: tuple(image.shape[:3]) for kind, image in opened.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{kind} {shape}" for kind, shape in shapes.items())
        raise CaseError(case.case_id, f"the files have different shapes: {listed}")
    reference = opened[SEQUENCES[0]]
    notes = []
    for kind, image in opened.items():
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            notes.append(f"the affine of {case.files[kind].name} differs from {case.files[SEQUENCES[0]].name}'s")
    images = np.empty((len(SEQUENCES),) + shapes[SEQUENCES[0]], dtype=np.float32)
    for channel, kind in enumerate(SEQUENCES):
        images[channel] = _data(case.case_id, case.files[kind], opened[kind], np.float32)
    label = None
    if with_label:
        raw = _data(case.case_id, case.files[LABEL], opened[LABEL], None)
        label = _as_labels(case.case_id, case.files[LABEL], raw, notes)
    header = reference.header.copy()
    return RawCase(case.case_id, images, label, reference.affine.copy(), header, notes)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None, dtype=None) -> Path:
    """Writes a 3-D volume with the given affine (and a copy of header, whose data type, scaling
    and intensity range are reset for the new data). The suffix (.nii or .nii.gz) decides
    compression. Writes to a temporary name first, so a crash never leaves a half-written file."""
    path = Path(path)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    header = header.copy() if header is not None else None
    image = nib.Nifti1Image(array, affine, header=header)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    partial = path.with_name(f".{path.name}.partial{suffix}")
    nib.save(image, os.fspath(partial))
    os.replace(partial, path)
    return path
