"""The paper's preprocessing, and its exact inverse for outputs.

1. Each sequence alone: robust min-max over the brain voxels (the nonzero ones, as BraTS images
   are skull-stripped with a zero background): clip to the `percentiles` (default 0.1 and 99.9)
   of the brain voxels, scale that range to [0, 1]; background voxels stay 0.
2. Zero-pad to the target grid (default 256^3) as the original code does: an axis of n voxels
   gets before = floor((target - n) / 2) voxels in front and after = target - n - before behind,
   i.e. 240 -> 256 by 8 and 8, 155 -> 256 by 50 and 51 (the original's [8:-8, 8:-8, 50:-51];
   floor rounding is what gives 50 in front). An axis longer than the target is cropped by the
   same rule (negative before/after); only then is the inverse not exact.
3. Map [0, 1] to [-1, 1] (2x - 1), so background and padding are both -1.

Labels are padded with 0 and kept as BraTS labels (uint8); the whole-tumour mask is label > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .layout import SEQUENCES, CaseFiles
from .nifti import RawCase, load_case, write_nifti
from .regions import whole_tumour

PAPER_VOLUME = (256, 256, 256)
DEFAULT_PERCENTILES = (0.1, 99.9)
PAD_VALUE = -1.0  # the model-range value of a zero-intensity (background) voxel


def as_shape(value, name: str = "shape") -> tuple[int, int, int]:
    """An int or a 3-sequence as a 3-tuple of positive ints."""
    shape = (int(value),) * 3 if np.isscalar(value) else tuple(int(v) for v in value)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return shape


@dataclass(frozen=True)
class Padding:
    """Pads (or crops) the last three axes from `original` to `target` shape, and back."""

    original: tuple[int, int, int]
    target: tuple[int, int, int]

    @property
    def before(self) -> tuple[int, int, int]:
        return tuple((t - n) // 2 for n, t in zip(self.original, self.target))

    @property
    def after(self) -> tuple[int, int, int]:
        return tuple(t - n - b for n, t, b in zip(self.original, self.target, self.before))

    def overlap(self):
        """(slices into the original grid, slices into the target grid) of the shared region."""
        src, dst = [], []
        for n, t, b in zip(self.original, self.target, self.before):
            length = min(n, t)
            src.append(slice(max(-b, 0), max(-b, 0) + length))
            dst.append(slice(max(b, 0), max(b, 0) + length))
        return (Ellipsis, *src), (Ellipsis, *dst)

    @staticmethod
    def _filled(like, shape, fill):
        if isinstance(like, torch.Tensor):
            return torch.full(shape, fill, dtype=like.dtype, device=like.device)
        return np.full(shape, fill, dtype=like.dtype)

    def _check(self, array, expected, what):
        if tuple(array.shape[-3:]) != tuple(expected):
            raise ValueError(f"Padding.{what}: expected an array ending in {tuple(expected)}, "
                             f"got shape {tuple(array.shape)}")

    def apply(self, array, fill=0):
        """array (..., *original) -> (..., *target), new cells set to fill."""
        self._check(array, self.original, "apply")
        out = self._filled(array, tuple(array.shape[:-3]) + self.target, fill)
        src, dst = self.overlap()
        out[dst] = array[src]
        return out

    def invert(self, array, fill=0):
        """array (..., *target) -> (..., *original): the inverse of apply (exact when no axis
        was cropped; cropped-away cells come back as fill)."""
        self._check(array, self.target, "invert")
        out = self._filled(array, tuple(array.shape[:-3]) + self.original, fill)
        src, dst = self.overlap()
        out[src] = array[dst]
        return out


def normalise_sequence(volume: np.ndarray, percentiles=DEFAULT_PERCENTILES) -> np.ndarray:
    """One sequence to [0, 1]: clip the brain (nonzero) voxels to their percentiles, min-max
    scale; background stays 0. A sequence without contrast in the brain becomes all 0."""
    volume = np.asarray(volume, dtype=np.float32)
    out = np.zeros_like(volume)
    brain = volume != 0
    values = volume[brain]
    if values.size == 0:
        return out
    low, high = np.percentile(values, percentiles)
    if not high > low:
        return out
    out[brain] = np.clip((values - low) / (high - low), 0.0, 1.0)
    return out


@dataclass
class CaseMeta:
    """What it takes to write an output on a case's original grid."""

    case_id: str
    affine: np.ndarray
    header: nib.Nifti1Header
    padding: Padding

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])

    def to_original(self, volume, fill=0):
        """A (..., *target) volume back on the original grid."""
        return self.padding.invert(volume, fill)

    def save(self, path: str | Path, volume, dtype=np.float32, fill=0) -> Path:
        """Writes a padded-grid volume (array or tensor) on the original grid, with the case's
        affine and header (its data type set to dtype)."""
        if isinstance(volume, torch.Tensor):
            volume = volume.detach().cpu().numpy()
        return write_nifti(path, self.to_original(np.asarray(volume), fill), self.affine, self.header, dtype)


@dataclass
class PreparedCase:
    """A case ready for the model: image (4, *target) float32 in [-1, 1] (channels t1, t1ce,
    t2, flair), label (*target) uint8 BraTS labels or None, and its meta."""

    image: torch.Tensor
    label: torch.Tensor | None
    meta: CaseMeta
    warnings: list[str]

    @property
    def case_id(self) -> str:
        return self.meta.case_id

    def mask(self) -> torch.Tensor:
        """The whole-tumour mask (1, *target) float32 in {0, 1}: the diffusion's x_0."""
        if self.label is None:
            raise ValueError(f"{self.case_id}: no segmentation was loaded")
        return whole_tumour(self.label).to(torch.float32).unsqueeze(0)


def prepare_raw(raw: RawCase, target=PAPER_VOLUME, *, percentiles=DEFAULT_PERCENTILES,
                image_out: torch.Tensor | None = None, label_out: torch.Tensor | None = None) -> PreparedCase:
    """Normalises, pads and maps a RawCase; writes into image_out / label_out when given
    (e.g. slots of a shared cache) instead of allocating."""
    padding = Padding(tuple(raw.images.shape[1:]), as_shape(target, "target"))
    shape = (len(SEQUENCES),) + padding.target
    image = image_out if image_out is not None else torch.empty(shape, dtype=torch.float32)
    if tuple(image.shape) != shape:
        raise ValueError(f"prepare_raw: image_out has shape {tuple(image.shape)}, expected {shape}")
    image.fill_(PAD_VALUE)
    src, dst = padding.overlap()
    for channel in range(len(SEQUENCES)):
        unit = normalise_sequence(raw.images[channel], percentiles)
        image[channel][dst] = torch.from_numpy(unit[src]).mul_(2.0).sub_(1.0)
    label = None
    if raw.label is not None:
        label = label_out if label_out is not None else torch.empty(padding.target, dtype=torch.uint8)
        label.zero_()
        label[dst] = torch.from_numpy(raw.label[src])
    meta = CaseMeta(raw.case_id, raw.affine, raw.header, padding)
    return PreparedCase(image, label, meta, list(raw.warnings))


def prepare_case(case: CaseFiles, target=PAPER_VOLUME, *, with_label: bool = True,
                 percentiles=DEFAULT_PERCENTILES) -> PreparedCase:
    """Reads and preprocesses one case (raises CaseError when it cannot be read)."""
    return prepare_raw(load_case(case, with_label=with_label), target, percentiles=percentiles)
