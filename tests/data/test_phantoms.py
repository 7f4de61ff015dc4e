"""Synthetic phantoms: determinism, plausible anatomy and tumour appearance, the written cases."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from patchddm_fast.data import find_cases, generate_phantom, load_case, write_phantoms
from patchddm_fast.data.phantoms import CSF, GM, WM, brats_affine, smooth_field
from patchddm_fast.data.preprocess import normalise_sequence
from patchddm_fast.metrics import dice

T1, T1CE, T2, FLAIR = range(4)
SHAPE = (40, 44, 36)


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(SHAPE, seed) for seed in range(4)]


def test_deterministic_from_the_seed(phantoms):
    again = generate_phantom(SHAPE, 0)
    assert np.array_equal(again.images, phantoms[0].images) and np.array_equal(again.label, phantoms[0].label)
    assert not np.array_equal(phantoms[1].label, phantoms[0].label)
    assert not np.allclose(phantoms[1].images, phantoms[0].images)


def test_smooth_field_has_unit_variance():
    field = smooth_field(np.random.default_rng(0), (30, 30, 30), 4)
    samples = np.stack([smooth_field(np.random.default_rng(s), (9, 9, 9), 4)[4, 4, 4] for s in range(400)])
    assert samples.std() == pytest.approx(1.0, abs=0.1) and abs(samples.mean()) < 0.15
    assert np.abs(np.diff(field, axis=0)).max() < 0.5  # smooth: small steps between neighbours


def test_labels_and_geometry(phantoms):
    sizes = []
    for phantom in phantoms:
        assert phantom.images.shape == (4,) + SHAPE and phantom.images.dtype == np.float32
        present = set(np.unique(phantom.label).tolist())
        assert {0, 2, 4} <= present <= {0, 1, 2, 4}
        head = phantom.images[T1] > 0
        assert (phantom.images[:, ~head] == 0).all()  # zero background, as BraTS
        assert not (phantom.label > 0)[~head].any()
        sizes.append(int((phantom.label > 0).sum()))
        centre = np.argwhere(phantom.label > 0).mean(axis=0)
        assert np.all(centre > 0.15 * np.array(SHAPE)) and np.all(centre < 0.85 * np.array(SHAPE))
    assert any(1 in np.unique(p.label) for p in phantoms)
    assert max(sizes) > 1.5 * min(sizes)  # sizes vary
    np.testing.assert_array_equal(brats_affine(SHAPE)[:3, :3], np.diag([-1.0, -1.0, 1.0]))


def _mean(phantom, channel, mask):
    return float(phantom.images[channel][mask].mean())


def test_tissue_and_tumour_contrast(phantoms):
    for phantom in phantoms:
        tissue, label = phantom.tissue, phantom.label
        tumour = label > 0
        brain = np.isin(tissue, (GM, WM))
        around = ndimage.binary_dilation(tumour, iterations=3) & ~tumour & brain
        assert _mean(phantom, FLAIR, tumour) > 1.2 * _mean(phantom, FLAIR, around)
        assert _mean(phantom, T2, tumour) > 1.2 * _mean(phantom, T2, around)
        enhancing, necrotic = label == 4, label == 1
        assert _mean(phantom, T1CE, enhancing) > 1.2 * _mean(phantom, T1CE, tissue == WM)
        if necrotic.sum() > 5:
            assert _mean(phantom, T1CE, necrotic) < 0.6 * _mean(phantom, T1CE, enhancing)
        assert _mean(phantom, T1, tissue == WM) > _mean(phantom, T1, tissue == GM) > _mean(phantom, T1, tissue == CSF)
        assert _mean(phantom, T2, tissue == CSF) > _mean(phantom, T2, tissue == WM)
        assert _mean(phantom, FLAIR, tissue == CSF) < _mean(phantom, FLAIR, tissue == WM)


def test_tumour_is_visible_but_not_trivially_separable(phantoms):
    """One flair threshold for all phantoms (after the paper's normalisation) finds much of the
    tumour, but not all of it: bias, noise, jitter and white-matter lesions overlap with it."""
    flair = np.concatenate([normalise_sequence(p.images[FLAIR]).ravel() for p in phantoms])
    tumour = np.concatenate([(p.label > 0).ravel() for p in phantoms])
    best = max(dice(flair > t, tumour) for t in np.linspace(0.02, 0.98, 49))
    assert 0.6 < best < 0.95


@pytest.mark.parametrize("layout", ["brats", "original"])
def test_written_cases_load(tmp_path, layout):
    written = write_phantoms(tmp_path, n=2, shape=(20, 24, 16), seed=3, layout=layout, first=7)
    cases, report = find_cases(tmp_path)
    assert report.problems == [] and [c.number for c in cases] == [7, 8]
    raw = load_case(cases[0])
    phantom = generate_phantom((20, 24, 16), np.random.SeedSequence([3, 7]))
    np.testing.assert_array_equal(raw.label, phantom.label)
    # The files store integers: rounding to the nearest moves a value by at most 0.5.
    np.testing.assert_allclose(raw.images, np.rint(phantom.images), atol=0.5)
    # The affine goes through the NIfTI header's float32 sform: numpy's default rtol 1e-7 is 1 ulp.
    np.testing.assert_allclose(raw.affine, phantom.affine)
    image = nib.load(str(cases[0].files["t1"]))
    assert image.get_data_dtype() == np.int16 and image.header.get_zooms() == (1.0, 1.0, 1.0)
    assert written[0].name == ("Phantom_007" if layout == "brats" else "000007")
