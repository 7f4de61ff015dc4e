"""Synthetic brain-tumour MRI cases in the BraTS layout, so everything runs without downloads.

A phantom is a head (scalp, skull, a thin CSF layer), a brain with cortex (grey matter of
varying thickness, CSF in sulci and in the interhemispheric fissure), white matter, deep grey
nuclei, two lateral ventricles, in most cases white-matter hyperintensities (a normal finding
that looks like oedema in flair and t2), and one or two gliomas: a necrotic core (label 1) inside an
enhancing rim (label 4) inside oedema (label 2), each an irregular blob of random size, shape,
orientation and position. Tissues take per-sequence intensities that mimic real scans: CSF
dark in t1 and flair, bright in t2; white matter brighter than grey in t1, darker in t2; the
rim enhancing in t1ce around a dark necrotic core; oedema bright in t2 and flair. Each case
jitters every intensity, and adds smooth texture, a smooth multiplicative bias field per
sequence, partial-volume blur and Rician noise, so tumour and normal tissue overlap in
intensity across the volume and the tumour is visible but not trivially separable.

Everything is deterministic from (seed, case number), vectorised with numpy: smooth random
fields are sums of Gaussian bumps, separable along the three axes, evaluated with three small
matrix products instead of full-volume convolutions, and each structure is computed in its
bounding box.
Anatomy scales with the grid: any shape works, 64^3 for quick runs, 240 x 240 x 155 as BraTS.
Voxels are 1 mm unless `spacing` says otherwise; the affine is BraTS's (x and y flipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .layout import LABEL, SEQUENCES
from .nifti import write_nifti

# Tissue classes of the label map used while building a phantom.
# WMH: white-matter hyperintensities, a normal finding that looks like oedema in flair and t2.
BACKGROUND, SCALP, SKULL, CSF, GM, WM, DEEP_GM, WMH, NECROSIS, ENHANCING, OEDEMA = range(11)
BRATS_LABEL_OF = {NECROSIS: 1, OEDEMA: 2, ENHANCING: 4}

# Relative intensity of each tissue in t1, t1ce, t2, flair (before per-case jitter).
CONTRAST = {
    SCALP: (0.95, 0.95, 0.55, 0.60),
    SKULL: (0.10, 0.10, 0.08, 0.08),
    CSF: (0.22, 0.22, 1.00, 0.12),
    GM: (0.62, 0.64, 0.60, 0.64),
    WM: (0.86, 0.86, 0.42, 0.48),
    DEEP_GM: (0.68, 0.70, 0.52, 0.56),
    WMH: (0.76, 0.76, 0.64, 0.74),
    NECROSIS: (0.32, 0.26, 0.88, 0.55),
    ENHANCING: (0.58, 1.35, 0.68, 0.82),
    OEDEMA: (0.60, 0.62, 0.76, 0.80),
}
_TUMOUR = (NECROSIS, ENHANCING, OEDEMA)


@dataclass(frozen=True)
class PhantomConfig:
    """Ranges the generator draws from (uniform between the pair's ends)."""

    core_radius: tuple[float, float] = (0.12, 0.24)  # tumour core, in units of the brain size
    oedema_factor: tuple[float, float] = (1.4, 2.1)  # oedema radius / core radius
    necrosis_fraction: tuple[float, float] = (0.35, 0.7)  # necrotic radius / core radius
    p_necrosis: float = 0.8  # otherwise a solid enhancing tumour
    p_second_tumour: float = 0.15
    p_wm_lesions: float = 0.6  # white-matter hyperintensities (distractors in flair)
    shape_irregularity: float = 0.25  # amplitude of the radial perturbation of the blobs
    contrast_jitter: float = 0.08  # relative per-case jitter of normal-tissue intensities
    tumour_jitter: float = 0.12  # relative per-case jitter of tumour intensities
    texture: float = 0.05  # relative amplitude of the smooth within-tissue texture
    bias: tuple[float, float] = (0.1, 0.25)  # std of the log bias field
    noise: tuple[float, float] = (0.03, 0.06)  # Rician sigma relative to white matter in t1
    blur: float = 0.6  # partial-volume blur, Gaussian sigma in voxels (0: off)


@dataclass
class Phantom:
    """images: (4, X, Y, Z) float32 (t1, t1ce, t2, flair), zero outside the head; label:
    (X, Y, Z) uint8 BraTS labels; tissue: (X, Y, Z) uint8 tissue classes; affine: 4x4."""

    images: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)


def brats_affine(shape, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """BraTS's voxel-to-world matrix: x and y flipped, y's origin at the far end."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    return affine


def _bumps(n: int, k: int) -> np.ndarray:
    """(n, k) Gaussian bumps along an axis of n voxels, each row of unit L2 norm, so that a
    field of iid N(0, 1) weights has unit variance at every voxel."""
    centres = np.linspace(0.0, n - 1.0, k)
    width = max((n - 1.0) / max(k - 1, 1), 1.0)
    phi = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / width) ** 2)
    return (phi / np.sqrt((phi ** 2).sum(axis=1, keepdims=True))).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape, k: int) -> np.ndarray:
    """A smooth random field of `shape` with about k bumps per axis, zero mean, unit variance."""
    x, y, z = shape
    px, py, pz = _bumps(x, k), _bumps(y, k), _bumps(z, k)
    weights = rng.standard_normal((k, k, k), dtype=np.float32)
    along_x = (px @ weights.reshape(k, k * k)).reshape(x, k, k)
    along_xy = np.einsum("xbc,yb->xyc", along_x, py, optimize=True)
    return (along_xy.reshape(x * y, k) @ pz.T).reshape(shape)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _box(centre, half: float, shape):
    """Slices of a cube of half-size `half` around centre, clipped to the grid, and the
    broadcastable voxel-coordinate offsets from the centre inside it."""
    slices, offsets = [], []
    for k in range(3):
        lo = int(max(0, np.floor(centre[k] - half)))
        hi = int(min(shape[k], np.ceil(centre[k] + half) + 1))
        slices.append(slice(lo, max(lo, hi)))
        view = [1, 1, 1]
        view[k] = max(0, hi - lo)
        offsets.append((np.arange(lo, max(lo, hi), dtype=np.float32) - np.float32(centre[k])).reshape(view))
    return tuple(slices), offsets


def _blob_radius(offsets, rotation, semi_axes) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) in a box, for a rotated ellipsoid."""
    total = 0.0
    for k in range(3):
        along = rotation[0, k] * offsets[0] + rotation[1, k] * offsets[1] + rotation[2, k] * offsets[2]
        total = total + (along / np.float32(semi_axes[k])) ** 2
    return np.sqrt(total, dtype=np.float32)


def _irregular_blob(rng, offsets, radius: float, irregularity: float, lobes: int) -> np.ndarray:
    """Normalised radius of an irregular blob: a union of rotated ellipsoidal lobes whose
    surface is pushed in and out by a smooth random field."""
    box_shape = np.broadcast_shapes(*(o.shape for o in offsets))
    rho = None
    for lobe in range(lobes):
        size = radius if lobe == 0 else radius * rng.uniform(0.45, 0.7)
        semi = size * rng.uniform(0.75, 1.3, size=3)
        semi *= size / np.cbrt(np.prod(semi))  # keep the volume of a ball of radius `size`
        shift = np.zeros(3) if lobe == 0 else _unit(rng) * radius * rng.uniform(0.6, 0.9)
        moved = [o - np.float32(shift[k]) for k, o in enumerate(offsets)]
        lobe_rho = _blob_radius(moved, _random_rotation(rng), semi)
        rho = lobe_rho if rho is None else np.minimum(rho, lobe_rho)
    # Two scales of bumps: lobes about the blob's size, and a finer, weaker ripple.
    coarse = int(np.clip(round(1.2 * max(box_shape) / max(radius, 1.0)), 3, 12))
    perturb = smooth_field(rng, box_shape, coarse)
    perturb += 0.5 * smooth_field(rng, box_shape, min(2 * coarse, 20))
    perturb *= np.float32(irregularity / np.sqrt(1.25))
    perturb += 1.0
    return rho / np.clip(perturb, 0.4, None)


def _unit(rng) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _anatomy(rng: np.random.Generator, shape, config: PhantomConfig) -> tuple[np.ndarray, dict]:
    """The tissue map of a healthy head, and the brain geometry for placing tumours."""
    ratios = np.array([0.70, 0.84, 0.62])  # brain semi-axes (left-right, front-back, up-down)
    layers = np.array([2.5, 8.5, 13.5]) / 100.0  # outer edge of CSF, skull, scalp beyond the brain
    scale = min(0.47 * n / (r + layers[-1]) for n, r in zip(shape, ratios))
    semi = ratios * scale * rng.uniform(0.93, 1.03, size=3)
    centre = np.array(shape, dtype=np.float64) / 2 - 0.5 + rng.uniform(-0.02, 0.02, size=3) * np.array(shape)
    mean_radius = float(np.cbrt(np.prod(semi)))

    grid = [((np.arange(n, dtype=np.float32) - np.float32(centre[k])) / np.float32(semi[k])).reshape(
        [n if j == k else 1 for j in range(3)]) for k, n in enumerate(shape)]
    radius = np.sqrt(grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2, dtype=np.float32)
    radius *= 1.0 + 0.05 * smooth_field(rng, shape, 5)
    depth = (1.0 - radius) * np.float32(mean_radius)  # ~ voxels inside the brain surface
    del radius

    tissue = np.zeros(shape, dtype=np.uint8)
    thickness = layers * scale
    tissue[depth >= -thickness[2]] = SCALP
    tissue[depth >= -thickness[1]] = SKULL
    tissue[depth >= -thickness[0]] = CSF
    brain = depth >= 0
    tissue[brain] = WM
    # Gyri: where the folding field is high the grey ribbon reaches deeper, around a sulcus of CSF.
    folding = smooth_field(rng, shape, max(6, round(max(shape) / 6)))
    ribbon = np.float32(0.03 * scale)
    band = ribbon * (1.0 + 1.5 * np.maximum(folding, 0.0))
    tissue[brain & (depth < band)] = GM
    tissue[brain & (depth < band - 0.8 * ribbon) & (folding > 0.6)] = CSF
    del folding, band
    fissure = (np.abs(grid[0]) * np.float32(semi[0]) < max(0.6, 0.008 * scale)) & (grid[2] > -0.15) \
        & (depth < 0.45 * mean_radius) & brain
    tissue[fissure] = CSF

    size = rng.uniform(0.8, 1.3)
    for side in (-1.0, 1.0):
        for kind, where, axes in ((CSF, (0.12, 0.04, 0.08), (0.08, 0.40 * size, 0.16 * size)),
                                  (DEEP_GM, (0.27, -0.02, -0.08), (0.11, 0.17, 0.14))):
            c = centre + np.array([side * where[0], where[1], where[2]]) * semi
            sem = np.array(axes) * semi
            slices, offsets = _box(c, float(sem.max()) * 1.5, shape)
            tilt = _small_rotation(rng, 0.15)
            region = tissue[slices]
            inside = (_blob_radius(offsets, tilt, sem) < 1.0) & brain[slices]
            if kind == DEEP_GM:
                inside &= region != CSF  # the ventricles stay whole
            region[inside] = kind
    if rng.uniform() < config.p_wm_lesions:
        _add_wm_lesions(rng, tissue, centre, semi, size)
    geometry = dict(centre=centre, semi=semi, scale=scale)
    return tissue, geometry


def _add_wm_lesions(rng, tissue: np.ndarray, centre, semi, ventricle_size: float) -> None:
    """Caps at the ventricles' front and back ends and a few small blobs, in white matter only."""
    spots = []
    for side in (-1.0, 1.0):
        for end in (-1.0, 1.0):
            where = np.array([side * 0.12, 0.04 + end * 0.40 * ventricle_size, 0.08])
            spots.append((centre + where * semi, np.array([0.07, 0.07, 0.06]) * semi * rng.uniform(0.8, 1.6)))
    for _ in range(int(rng.integers(0, 5))):
        u = rng.uniform(-0.6, 0.6, size=3)
        spots.append((centre + u * semi, np.full(3, rng.uniform(0.03, 0.06)) * semi))
    for spot, axes in spots:
        slices, offsets = _box(spot, float(axes.max()) * 1.5, tissue.shape)
        region = tissue[slices]
        region[(_blob_radius(offsets, _random_rotation(rng), axes) < 1.0) & (region == WM)] = WMH


def _small_rotation(rng, angle: float) -> np.ndarray:
    a, b, c = rng.uniform(-angle, angle, size=3)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _add_tumour(rng, tissue: np.ndarray, geometry: dict, config: PhantomConfig, size_factor: float = 1.0) -> dict:
    """Draws one glioma into the tissue map (inside the brain only); returns its parameters."""
    scale, semi, centre = geometry["scale"], geometry["semi"], geometry["centre"]
    core = scale * rng.uniform(*config.core_radius) * size_factor
    oedema = core * rng.uniform(*config.oedema_factor)
    while True:  # a centre well inside the brain ellipsoid
        u = rng.uniform(-1.0, 1.0, size=3)
        if np.linalg.norm(u) <= 1.0:
            break
    where = centre + u * semi * np.clip(1.0 - 1.1 * core / semi, 0.2, 0.75)
    slices, offsets = _box(where, oedema * 1.8, tissue.shape)
    region = tissue[slices]
    tissue_ok = (region == WM) | (region == DEEP_GM) | (region >= WMH)  # oedema spares the cortex
    in_brain = tissue_ok | (region == GM)
    core_rho = _irregular_blob(rng, offsets, core, config.shape_irregularity, lobes=int(rng.integers(1, 3)))
    shift = _unit(rng) * core * rng.uniform(0.0, 0.35)
    moved = [o - np.float32(shift[k]) for k, o in enumerate(offsets)]
    oedema_rho = _irregular_blob(rng, moved, oedema, config.shape_irregularity * 1.4, lobes=int(rng.integers(1, 4)))
    necrotic = rng.uniform() < config.p_necrosis
    # The rim is at least 1.5 voxels thick, or partial-volume blur would wash it out.
    fraction = min(rng.uniform(*config.necrosis_fraction), 1.0 - 1.5 / core) if necrotic else 0.0
    oedema_mask = (oedema_rho < 1.0) & tissue_ok & (region != NECROSIS) & (region != ENHANCING)
    region[oedema_mask] = OEDEMA
    core_mask = (core_rho < 1.0) & in_brain
    region[core_mask] = ENHANCING
    region[core_mask & (core_rho < fraction)] = NECROSIS
    return dict(centre=where.tolist(), core_radius=core, oedema_radius=oedema, necrotic=necrotic)


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    slices = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        slices.append(slice(max(0, hit[0] - margin), min(mask.shape[axis], hit[-1] + 1 + margin)))
    return tuple(slices)


def _render(rng, tissue: np.ndarray, config: PhantomConfig) -> np.ndarray:
    """Per-sequence intensities of the tissue map with texture, bias, blur and Rician noise.

    Works in the head's bounding box, in place where it can: fresh full-size temporaries cost
    more in page faults than the arithmetic on them."""
    images = np.zeros((len(SEQUENCES),) + tissue.shape, dtype=np.float32)
    box = _bounding_box(tissue != BACKGROUND, margin=int(np.ceil(3 * config.blur)) + 1)
    tissue = tissue[box]
    shape = tissue.shape
    outside = tissue == BACKGROUND
    texture = smooth_field(rng, shape, 12)
    texture *= config.texture
    texture += 1.0
    tumour = tissue >= NECROSIS  # the tumour classes are the last three
    tumour_box = _bounding_box(tumour)
    inside = tumour[tumour_box]
    tumour_texture = 1.0 + 2 * config.texture * smooth_field(rng, inside.shape, 6)
    texture[tumour_box][inside] = tumour_texture[inside]
    image, real, imaginary = (np.empty(shape, dtype=np.float32) for _ in range(3))
    white_t1 = None
    for channel in range(len(SEQUENCES)):
        table = np.zeros(len(CONTRAST) + 1, dtype=np.float32)
        for kind, values in CONTRAST.items():
            jitter = config.tumour_jitter if kind in _TUMOUR else config.contrast_jitter
            table[kind] = values[channel] * (1.0 + rng.uniform(-jitter, jitter))
        if white_t1 is None:
            white_t1 = float(table[WM])
        np.take(table, tissue, out=image)
        image *= texture
        if config.blur > 0:
            ndimage.gaussian_filter(image, config.blur, mode="constant", truncate=3.0, output=real)
            image, real = real, image
        bias = smooth_field(rng, shape, 3)
        bias *= rng.uniform(*config.bias)
        image *= np.exp(bias, out=bias)
        sigma = np.float32(rng.uniform(*config.noise) * white_t1)
        rng.standard_normal(shape, dtype=np.float32, out=real)
        real *= sigma
        real += image
        rng.standard_normal(shape, dtype=np.float32, out=imaginary)
        imaginary *= sigma
        np.multiply(real, real, out=real)
        np.multiply(imaginary, imaginary, out=imaginary)
        real += imaginary
        np.sqrt(real, out=image)
        image[outside] = 0.0
        image *= np.float32(rng.uniform(400.0, 1200.0))  # arbitrary scanner units
        images[channel][box] = image
    return images


def generate_phantom(shape=(64, 64, 64), seed: int = 0, *, spacing=(1.0, 1.0, 1.0),
                     config: PhantomConfig = PhantomConfig()) -> Phantom:
    """One synthetic case of the given grid shape, fully determined by `seed` (an int or a
    numpy SeedSequence, as case_seed gives)."""
    shape = tuple(int(n) for n in (shape if np.ndim(shape) else (shape,) * 3))
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"generate_phantom: shape must be 3 sizes of at least 16 voxels, got {shape}")
    rng = np.random.default_rng(seed)
    tissue, geometry = _anatomy(rng, shape, config)
    tumours = [_add_tumour(rng, tissue, geometry, config)]
    if rng.uniform() < config.p_second_tumour:
        tumours.append(_add_tumour(rng, tissue, geometry, config, size_factor=0.6))
    images = _render(rng, tissue, config)
    label = np.zeros(shape, dtype=np.uint8)
    for kind, value in BRATS_LABEL_OF.items():
        label[tissue == kind] = value
    return Phantom(images, label, tissue, brats_affine(shape, spacing), dict(tumours=tumours))


def case_seed(seed: int, number: int) -> np.random.SeedSequence:
    """The seed of case `number` of a collection generated with `seed`."""
    return np.random.SeedSequence([int(seed), int(number)])


def write_case(phantom: Phantom, folder: str | os.PathLike, case_id: str, *, layout: str = "brats",
               number: int | None = None) -> Path:
    """Writes a phantom as one case folder: images int16 and the segmentation uint8 (.nii.gz).

    layout "brats": folder/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz;
    layout "original": folder/<number:06d>/brats_train_<number:03d>_<seq>_123_w.nii.gz.
    """
    if layout == "brats":
        case_dir = Path(folder) / case_id
        names = {kind: f"{case_id}_{kind}.nii.gz" for kind in SEQUENCES + (LABEL,)}
    elif layout == "original":
        if number is None:
            raise ValueError("write_case: the original layout needs a case number")
        case_dir = Path(folder) / f"{number:06d}"
        names = {kind: f"brats_train_{number:03d}_{kind}_123_w.nii.gz" for kind in SEQUENCES + (LABEL,)}
    else:
        raise ValueError(f"write_case: layout must be 'brats' or 'original', got {layout!r}")
    for channel, kind in enumerate(SEQUENCES):
        data = np.clip(np.rint(phantom.images[channel]), 0, np.iinfo(np.int16).max).astype(np.int16)
        write_nifti(case_dir / names[kind], data, phantom.affine)
    write_nifti(case_dir / names[LABEL], phantom.label, phantom.affine)
    return case_dir


def write_phantoms(folder: str | os.PathLike, n: int = 8, shape=(64, 64, 64), seed: int = 0, *,
                   layout: str = "brats", first: int = 1, prefix: str = "Phantom",
                   config: PhantomConfig = PhantomConfig(), progress: bool = False) -> list[Path]:
    """Writes cases number first .. first + n - 1 (case ids <prefix>_<NNN>); each case depends
    only on (seed, its number), so collections of different n share their common cases."""
    numbers = range(first, first + n)
    if progress:
        from tqdm import tqdm
        numbers = tqdm(numbers, desc="writing phantoms", unit="case")
    written = []
    for number in numbers:
        phantom = generate_phantom(shape, case_seed(seed, number), config=config)
        written.append(write_case(phantom, folder, f"{prefix}_{number:03d}", layout=layout, number=number))
    return written
