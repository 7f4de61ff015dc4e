"""Reading cases, the paper's preprocessing, padding and its inverse, writing outputs."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from patchddm_fast.data import CaseError, brats_regions, find_cases, load_case, prepare_case, whole_tumour
from patchddm_fast.data.preprocess import Padding, normalise_sequence

from cases import AFFINE, SEQS, case_arrays


def test_load_case_keeps_order_affine_header(make_case, tmp_path):
    make_case("BraTS20_Training_001", shape=(12, 10, 8), seed=3)
    (case,), _ = find_cases(tmp_path)
    raw = load_case(case)
    images, label = case_arrays((12, 10, 8), seed=3)
    assert raw.images.dtype == np.float32 and raw.images.shape == (4, 12, 10, 8)
    for channel, seq in enumerate(SEQS):
        np.testing.assert_array_equal(raw.images[channel], images[seq])
    np.testing.assert_array_equal(raw.label, label)
    assert raw.label.dtype == np.uint8
    # Through the header's float32 sform: numpy's default rtol 1e-7, about 1 float32 ulp.
    np.testing.assert_allclose(raw.affine, AFFINE)
    assert raw.spacing == (1.0, 1.0, 2.0)


def test_unreadable_and_mismatching_files_raise_case_errors(make_case, tmp_path):
    folder = make_case("BraTS20_Training_001")
    path = folder / "BraTS20_Training_001_flair.nii.gz"
    raw_bytes = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw_bytes)[:-200])  # truncated: header intact, data cut short
    (case,), _ = find_cases(tmp_path)
    with pytest.raises(CaseError, match=r"BraTS20_Training_001: cannot read .*flair\.nii\.gz"):
        load_case(case)
    path.write_bytes(b"garbage, not gzip at all")
    with pytest.raises(CaseError, match="cannot read BraTS20_Training_001_flair.nii.gz"):
        load_case(case)

    other = make_case("BraTS20_Training_002")
    nib.save(nib.Nifti1Image(np.ones((12, 10, 7), np.int16), AFFINE), str(other / "BraTS20_Training_002_t2.nii.gz"))
    cases, _ = find_cases(tmp_path)
    with pytest.raises(CaseError, match=r"different shapes: .*t2 \(12, 10, 7\)"):
        load_case(cases[1])

    four_d = make_case("BraTS20_Training_003")
    nib.save(nib.Nifti1Image(np.ones((12, 10, 8, 2), np.int16), AFFINE), str(four_d / "BraTS20_Training_003_t1.nii.gz"))
    cases, _ = find_cases(tmp_path)
    with pytest.raises(CaseError, match="not a 3-D volume"):
        load_case(cases[2])


def test_odd_labels_are_warnings(make_case, tmp_path):
    folder = make_case("BraTS20_Training_001")
    _, label = case_arrays((12, 10, 8), 0)
    odd = label.astype(np.float32)
    odd[odd == 4] = 3.0
    odd[0, 0, 0] = 0.0004  # float noise from resampling
    nib.save(nib.Nifti1Image(odd, AFFINE), str(folder / "BraTS20_Training_001_seg.nii.gz"))
    (case,), _ = find_cases(tmp_path)
    raw = load_case(case)
    assert set(np.unique(raw.label)) == {0, 1, 2, 3}
    assert any("labels [3]" in note for note in raw.warnings)


@pytest.mark.parametrize("n, target, before, after", [(240, 256, 8, 8), (155, 256, 50, 51), (256, 256, 0, 0),
                                                      (7, 12, 2, 3), (64, 64, 0, 0)])
def test_padding_amounts(n, target, before, after):
    padding = Padding((n, n, n), (target, target, target))
    assert padding.before == (before,) * 3 and padding.after == (after,) * 3


def test_padding_matches_the_original_slicing():
    """The original put a 240 x 240 x 155 volume at [8:-8, 8:-8, 50:-51] of a 256^3 zero volume."""
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((1, 240, 240, 155)).astype(np.float32)
    expected = np.zeros((1, 256, 256, 256), np.float32)
    expected[:, 8:-8, 8:-8, 50:-51] = volume
    padding = Padding((240, 240, 155), (256, 256, 256))
    padded = padding.apply(volume)
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(padding.invert(padded), volume)
    tensor = torch.from_numpy(padded)
    assert torch.equal(padding.invert(tensor), torch.from_numpy(volume))


@pytest.mark.parametrize("original, target", [((5, 9, 4), (8, 9, 11)), ((1, 2, 3), (4, 4, 4)), ((6, 5, 4), (6, 5, 4))])
def test_padding_inverse_is_exact(original, target):
    data = np.random.default_rng(1).integers(1, 100, size=(3,) + original)
    padding = Padding(original, target)
    padded = padding.apply(data, fill=-7)
    assert padded.shape == (3,) + target
    assert (padded == -7).sum() == 3 * (np.prod(target) - np.prod(original))
    np.testing.assert_array_equal(padding.invert(padded), data)


def test_padding_crops_longer_axes():
    data = np.arange(10 * 3 * 3).reshape(10, 3, 3)
    padding = Padding((10, 3, 3), (6, 5, 3))
    assert padding.before == (-2, 1, 0) and padding.after == (-2, 1, 0)
    np.testing.assert_array_equal(padding.apply(data)[:, 1:4], data[2:8])
    back = padding.invert(padding.apply(data))
    np.testing.assert_array_equal(back[2:8], data[2:8])
    assert not back[:2].any() and not back[8:].any()
    with pytest.raises(ValueError, match="ending in"):
        padding.invert(data)


def test_normalise_sequence():
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 20, 20), np.float32)
    volume[2:18, 2:18, 2:18] = rng.uniform(100, 300, size=(16, 16, 16))
    volume[5, 5, 5] = 1e6  # an outlier the percentile clipping must absorb
    unit = normalise_sequence(volume, (0.5, 99.5))
    brain = volume != 0
    low, high = np.percentile(volume[brain], [0.5, 99.5])
    expected = np.clip((volume - low) / (high - low), 0, 1) * brain
    # Values in [0, 1], both sides float32 arithmetic in a different order: a few ulps (6e-8).
    np.testing.assert_allclose(unit, expected, atol=1e-6)
    assert unit.min() == 0 and unit.max() == 1 and (unit[~brain] == 0).all()
    assert np.median(unit[brain]) == pytest.approx(0.5, abs=0.05)  # not squashed by the outlier
    assert not normalise_sequence(np.full((4, 4, 4), 5.0)).any()  # no contrast: all zero
    assert not normalise_sequence(np.zeros((4, 4, 4))).any()


def test_prepare_case(make_case, tmp_path):
    make_case("BraTS20_Training_001", shape=(12, 10, 8), seed=5)
    (case,), _ = find_cases(tmp_path)
    prepared = prepare_case(case, (16, 16, 12))
    images, label = case_arrays((12, 10, 8), 5)
    assert prepared.image.shape == (4, 16, 16, 12) and prepared.image.dtype == torch.float32
    assert prepared.image.min() == -1 and prepared.image.max() == 1
    for channel, seq in enumerate(SEQS):  # independent: normalise, then zero-pad in [0, 1], then 2x - 1
        unit = normalise_sequence(images[seq].astype(np.float32))
        expected = np.zeros((16, 16, 12), np.float32)
        expected[2:14, 3:13, 2:10] = unit
        np.testing.assert_allclose(prepared.image[channel].numpy(), 2 * expected - 1, atol=1e-6)
    expected_label = np.zeros((16, 16, 12), np.uint8)
    expected_label[2:14, 3:13, 2:10] = label
    np.testing.assert_array_equal(prepared.label.numpy(), expected_label)
    mask = prepared.mask()
    assert mask.shape == (1, 16, 16, 12) and torch.equal(mask[0] > 0, torch.from_numpy(expected_label > 0))
    np.testing.assert_array_equal(prepared.meta.to_original(prepared.label.numpy()), label)


def test_outputs_are_written_on_the_original_grid(make_case, tmp_path):
    make_case("BraTS20_Training_001", shape=(12, 10, 8))
    (case,), _ = find_cases(tmp_path)
    prepared = prepare_case(case, 16)
    path = prepared.meta.save(tmp_path / "out" / "mask.nii.gz", prepared.mask()[0] > 0, dtype=np.uint8)
    written = nib.load(str(path))
    assert written.shape == (12, 10, 8) and written.get_data_dtype() == np.uint8
    # Through the header's float32 sform: numpy's default rtol 1e-7, about 1 float32 ulp.
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.header.get_zooms() == (1.0, 1.0, 2.0)
    _, label = case_arrays((12, 10, 8), 0)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (label > 0).astype(np.uint8))
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_regions():
    label = np.array([0, 1, 2, 4, 0])
    regions = brats_regions(label)
    np.testing.assert_array_equal(regions["WT"], [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(regions["TC"], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(regions["ET"], [0, 0, 0, 1, 0])
    assert torch.equal(whole_tumour(torch.tensor(label)), torch.tensor([False, True, True, True, False]))
