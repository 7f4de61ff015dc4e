"""Reading one case's NIfTI files (lazily: nothing is read before a case is asked for) and
writing outputs with a case's own affine and header.

Every failure to read a case becomes a CaseError naming the case and the file, so a caller can
report it and go on with the other cases.

What is checked on input, before a voxel is used:
- the header (nibabel): a NIfTI-1 or NIfTI-2 header, a 3-D grid (trailing dimensions of 1 are
  dropped), at most MAX_VOXELS voxels, checked before anything is allocated for the data;
- the whole file: a gzipped file is decompressed to its end, so gzip's CRC-32 and length
  check every byte (reading only as far as the voxels end, as nibabel does, never sees them);
  a file shorter than its header's grid, or with much more data after it, is refused;
- the voxels: finite (no NaN or infinity); the label map: integers 0..255.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .._files import atomic_save
from .layout import LABEL, SEQUENCES, CaseError, CaseFiles

BRATS_LABELS = (0, 1, 2, 4)  # background, necrotic/non-enhancing core, oedema, enhancing tumour

# The largest grid a volume may claim in its header: 2^28 voxels (e.g. 640^3; BraTS's 240 x 240
# x 155 is 8.9 million). A damaged header claiming more is refused before any allocation.
MAX_VOXELS = 2**28
# Data after the voxels that a file may hold (its end is still read, to check the CRC).
_MAX_TRAILING_BYTES = 16 * 2**20
_GZIP_MAGIC = b"\x1f\x8b"


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
    """The file's header (nibabel reads no voxel yet), checked: 3-D, at most MAX_VOXELS."""
    try:
        image = nib.load(os.fspath(path))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CaseError(case_id, f"cannot read {path.name} ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(case_id, f"{path.name} is not a NIfTI-1 or NIfTI-2 file "
                        f"(nibabel reads it as {type(image).__name__})", path)
    if len(image.shape) > 3 and any(n != 1 for n in image.shape[3:]):
        raise CaseError(case_id, f"{path.name} is not a 3-D volume (shape {image.shape})", path)
    if len(image.shape) < 3:
        raise CaseError(case_id, f"{path.name} is not a 3-D volume (shape {image.shape})", path)
    voxels = math.prod(int(n) for n in image.shape)
    if voxels > MAX_VOXELS:
        grid = " x ".join(str(n) for n in image.shape[:3])
        raise CaseError(case_id, f"cannot read {path.name}: its header claims a {grid} grid ({voxels:,} voxels), "
                        f"more than the {MAX_VOXELS:,} a volume may have; the file is damaged or not a brain MRI",
                        path)
    return image


def read_header(path: str | os.PathLike) -> nib.Nifti1Image:
    """A NIfTI file's header as a nibabel image whose voxels are not read (use its .shape,
    .affine, .header), checked as a case's files are (3-D, at most MAX_VOXELS voxels).
    Raises CaseError naming the file; its case id is the name of the file's folder."""
    path = Path(path)
    return _open(path.parent.name, path)


def _verified_bytes(case_id: str, path: Path, image: nib.Nifti1Image) -> bytes:
    """The whole (decompressed) file, read to its end so that gzip checks the CRC-32 and the
    length of every byte. Keeps no more than the header's grid needs (and reads at most
    _MAX_TRAILING_BYTES beyond it), so a damaged header or a decompression bomb cannot exhaust
    memory. Raises CaseError for a file shorter than its grid; gzip and zlib errors pass."""
    header = image.header
    voxel_bytes = math.prod(int(n) for n in image.shape) * header.get_data_dtype().itemsize
    needed = int(image.dataobj.offset) + voxel_bytes  # nibabel resets the header's vox_offset; the proxy has it
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        data = stream.read(needed)
        trailing = 0
        while chunk := stream.read(2**20):  # to the end: gzip checks CRC and length there
            trailing += len(chunk)
            if trailing > _MAX_TRAILING_BYTES:
                raise CaseError(case_id, f"cannot read {path.name}: it holds more than {_MAX_TRAILING_BYTES:,} "
                                f"bytes after the {needed:,} its header describes; it is damaged", path)
    if len(data) < needed:
        what = "its decompressed data" if compressed else "the file"
        raise CaseError(case_id, f"cannot read {path.name}: it is truncated: {what} ends after {len(data):,} "
                        f"bytes, but its header's {' x '.join(str(n) for n in image.shape[:3])} grid of "
                        f"{header.get_data_dtype()} needs {needed:,}", path)
    return data


def _data(case_id: str, path: Path, image: nib.Nifti1Image, dtype) -> np.ndarray:
    """The voxels as `dtype` (scaled by the header's slope and intercept), or in the stored
    integer type when dtype is None and the file holds unscaled integers (labels). The whole
    file is read and verified first (see _verified_bytes)."""
    try:
        verified = type(image).from_bytes(_verified_bytes(case_id, path, image))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(verified.dataobj) if dtype is None else verified.get_fdata(dtype=dtype)
    except CaseError:
        raise
    except MemoryError:
        raise CaseError(case_id, f"not enough memory to read {path.name} (a {image.shape} grid)", path) from None
    except gzip.BadGzipFile as exc:  # CRC or length mismatch, not a gzip stream
        raise CaseError(case_id, f"cannot read {path.name}: it is corrupted ({exc})", path) from None
    except zlib.error as exc:  # a damaged deflate stream
        raise CaseError(case_id, f"cannot read {path.name}: it is corrupted (zlib: {exc})", path) from None
    except EOFError as exc:  # the gzip stream stops before its end
        raise CaseError(case_id, f"cannot read {path.name}: it is truncated ({exc})", path) from None
    except Exception as exc:  # a short file (OSError), a bad header field ...
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


def load_case(case: CaseFiles, *, with_label: bool = True, max_shape=None) -> RawCase:
    """Reads a case's four sequences (and its segmentation when with_label).

    Raises CaseError for a missing, unreadable, corrupted or truncated file, a file that is not
    3-D or claims more than MAX_VOXELS voxels, NaNs, shapes that differ between the files, or
    (with max_shape, 3 ints) a grid larger than max_shape on some axis; all but the last two
    name the file. Affines that differ are a warning (kept in .warnings). Headers are checked
    before any voxel is read.
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
    shape = shapes[SEQUENCES[0]]
    if max_shape is not None and any(n > m for n, m in zip(shape, max_shape)):
        raise CaseError(case.case_id, f"its grid {shape} (in {case.folder}) is larger than the volume grid "
                        f"{tuple(max_shape)} on some axis; it would have to be cropped, so it is not used "
                        "(a larger volume grid takes it)")
    reference = opened[SEQUENCES[0]]
    notes = []
    for kind, image in opened.items():
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            notes.append(f"the affine of {case.files[kind].name} differs from {case.files[SEQUENCES[0]].name}'s")
    try:
        images = np.empty((len(SEQUENCES),) + shape, dtype=np.float32)
    except MemoryError:
        raise CaseError(case.case_id, f"not enough memory for its {shape} grid (in {case.folder})") from None
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
    compression. Writes to a temporary name first, so a crash never leaves a half-written file
under the final name; the temporary file is removed when writing fails (raises OSError naming
the final path for a full disk, a read-only folder ...)."""
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
    return atomic_save(path, lambda partial: nib.save(image, os.fspath(partial)), suffix=suffix)
