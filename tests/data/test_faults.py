"""Fault injection for the data layer (issue 14): damaged and truncated .nii.gz files, headers
claiming absurd grids, a full disk while writing, symbolic links, duplicate case ids, cases
that no longer fit, and splits that must not move when a case breaks. Volumes are tiny (16^3).
"""

import errno
import gzip
import io
import logging
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from cases import write_case

from patchddm_fast.data import CaseError, PatchDataset, find_cases, load_case, split_cases, write_nifti
from patchddm_fast.data import nifti as nifti_module
from patchddm_fast.data.split import paper_split  # not among the package's user-facing names

SHAPE = (16, 16, 16)
KINDS = ("t1", "t1ce", "t2", "flair", "seg")


def _case(root, case_id="Case_001", shape=SHAPE, seed=0):
    write_case(root, case_id, shape=shape, seed=seed)
    (case,), _ = find_cases(root / case_id)
    return case


def _stored(path):
    """Rewrites a .nii.gz with deflate's stored (uncompressed) blocks: still a valid gzip
    file, but damage to its middle decodes into other voxels instead of a zlib error, so only
    the CRC can tell."""
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0, mtime=0))


def _flip(path, start, count=50):
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


# -- 1. corrupted and truncated files -----------------------------------------------------------

def test_flipped_bytes_in_the_middle_are_refused_naming_the_file(tmp_path):
    case = _case(tmp_path)
    path = case.files["t1ce"]
    _stored(path)
    _flip(path, len(path.read_bytes()) // 2)
    with pytest.raises(CaseError, match=re.escape(path.name) + ".*corrupted.*CRC") as caught:
        load_case(case)
    assert caught.value.path == path and caught.value.case_id == "Case_001"


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.9])
def test_flipped_bytes_in_a_compressed_file_are_refused(tmp_path, where):
    case = _case(tmp_path)
    path = case.files["flair"]
    _flip(path, int(len(path.read_bytes()) * where))
    with pytest.raises(CaseError, match=re.escape(path.name)):
        load_case(case)


def test_damaged_crc_is_refused(tmp_path):
    case = _case(tmp_path)
    path = case.files["t2"]
    _flip(path, len(path.read_bytes()) - 8, count=1)  # the CRC-32 in the gzip trailer
    with pytest.raises(CaseError, match=re.escape(path.name) + ".*corrupted"):
        load_case(case)


def test_missing_gzip_trailer_is_refused(tmp_path):
    case = _case(tmp_path)
    path = case.files["t1"]
    path.write_bytes(path.read_bytes()[:-8])  # every voxel is there, CRC and length are not
    with pytest.raises(CaseError, match=re.escape(path.name) + ".*truncated"):
        load_case(case)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_files_are_refused(tmp_path, keep):
    case = _case(tmp_path)
    path = case.files["seg"]
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CaseError, match=re.escape(path.name)):
        load_case(case)


def test_truncated_uncompressed_file_is_refused(tmp_path):
    case = _case(tmp_path)
    gz = case.files["t1"]
    path = gz.with_name(gz.name[:-3])
    path.write_bytes(gzip.decompress(gz.read_bytes())[:-100])
    gz.unlink()
    case.files["t1"] = path
    with pytest.raises(CaseError, match=re.escape(path.name) + ".*truncated.*needs"):
        load_case(case)


def test_good_files_read_as_nibabel_reads_them(tmp_path):
    case = _case(tmp_path)
    raw = load_case(case)
    for channel, kind in enumerate(KINDS[:4]):
        expected = nib.load(str(case.files[kind])).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(raw.images[channel], expected)
    np.testing.assert_array_equal(raw.label, np.asanyarray(nib.load(str(case.files["seg"])).dataobj))
    # A gzip file of several members is valid (each member's CRC is checked).
    path = case.files["t1"]
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(load_case(case).images[0], raw.images[0])


def test_evaluation_reads_through_the_verifying_path(tmp_path):
    from patchddm_fast.evaluation import read_mask
    case = _case(tmp_path)
    path = case.files["seg"]
    _stored(path)
    _flip(path, len(path.read_bytes()) // 2)
    with pytest.raises(CaseError, match=re.escape(path.name) + ".*corrupted"):
        read_mask(path, "Case_001")


def test_dataset_skips_a_corrupted_case(tmp_path):
    good = _case(tmp_path, "Case_001")
    bad = _case(tmp_path, "Case_002", seed=1)
    _stored(bad.files["t1ce"])
    _flip(bad.files["t1ce"], len(bad.files["t1ce"].read_bytes()) // 2)
    dataset = PatchDataset([good, bad], patch_shape=8, volume_shape=16, cache_bytes=0)
    assert {dataset[n].case_index for n in range(6)} == {0}
    assert dataset.report.failed_cases == ["Case_002"]
    assert "Case_002_t1ce.nii.gz" in dataset.report.format()


# -- 3. the split does not depend on which cases are readable -----------------------------------

def _touch_cases(root, numbers, name="Case_{:03d}"):
    """Case folders holding empty files: enough for find_cases and the split, which read names."""
    for number in numbers:
        case_id = name.format(number)
        (root / case_id).mkdir(parents=True)
        for kind in KINDS:
            (root / case_id / f"{case_id}_{kind}.nii.gz").touch()


def _parts(root):
    cases, _ = find_cases(root)
    return {case.case_id: part for part, members in split_cases(cases).items() for case in members}


def test_an_unusable_case_moves_no_other_case(tmp_path):
    _touch_cases(tmp_path, range(1, 31))
    full = _parts(tmp_path)
    assert sorted(full.values()).count("test") == 3
    for number in (4, 17, 30):  # one sequence deleted: the case is unusable, the others stay put
        flair = tmp_path / f"Case_{number:03d}" / f"Case_{number:03d}_flair.nii.gz"
        flair.unlink()
        now = _parts(tmp_path)
        assert f"Case_{number:03d}" not in now
        assert now == {k: v for k, v in full.items() if k in now}, number
        flair.touch()
    # Our own outputs sampled into a folder inside the data (no image in it) move nothing either.
    preds = tmp_path / "preds_7"
    preds.mkdir()
    (preds / "Case_001_mask.nii.gz").touch()
    assert {k: v for k, v in _parts(tmp_path).items() if k in full} == full


def test_brats_split_is_the_papers_even_when_case_369_is_unusable(tmp_path):
    _touch_cases(tmp_path, range(1, 370), name="BraTS20_Training_{:03d}")
    expected = paper_split()
    parts = _parts(tmp_path)
    for part in ("train", "validation", "test"):
        assert sorted(int(k[-3:]) for k, v in parts.items() if v == part) == list(getattr(expected, part))
    (tmp_path / "BraTS20_Training_369" / "BraTS20_Training_369_flair.nii.gz").unlink()
    without = _parts(tmp_path)
    assert without == {k: v for k, v in parts.items() if k != "BraTS20_Training_369"}


# -- 5. a case larger than the volume grid is refused, not cropped ------------------------------

def test_a_case_larger_than_the_volume_is_skipped_not_cropped(tmp_path, caplog):
    small = _case(tmp_path, "Case_001")
    large = _case(tmp_path, "Case_002", shape=(20, 16, 16), seed=1)
    dataset = PatchDataset([small, large], patch_shape=8, volume_shape=16, cache_bytes=0)
    with caplog.at_level(logging.WARNING, logger="patchddm_fast"):
        with pytest.raises(CaseError, match=r"Case_002: its grid \(20, 16, 16\).*larger than the volume grid "
                                            r"\(16, 16, 16\)"):
            dataset.volume(1)
    assert "skipping Case_002" in caplog.text and "(20, 16, 16)" in caplog.text
    assert {dataset[n].case_index for n in range(6)} == {0}
    assert dataset.report.failed_cases == ["Case_002"]


# -- 6. a header claiming a huge grid is a bad case, not a MemoryError --------------------------

def _claim_grid(path, grid):
    """Rewrites the header of a .nii.gz to claim `grid`; the voxels stay those of 16^3."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape(grid)
    path.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock):]))


def test_a_huge_header_is_a_bad_case(tmp_path):
    good = _case(tmp_path, "Case_001")
    huge = _case(tmp_path, "Case_002", seed=1)
    for kind in KINDS:
        _claim_grid(huge.files[kind], (1500, 1500, 1500))
    with pytest.raises(CaseError, match="Case_002_t1.nii.gz: its header claims a 1500 x 1500 x 1500 grid"):
        load_case(huge)
    dataset = PatchDataset([huge, good], patch_shape=8, volume_shape=16, cache_bytes=0)
    assert {dataset[n].case_index for n in range(6)} == {1}
    assert dataset.report.failed_cases == ["Case_002"]
    from patchddm_fast.data.nifti import read_header  # header-only reads (the trainer's volume size) check too
    with pytest.raises(CaseError, match="1500 x 1500 x 1500"):
        read_header(huge.files["t1"])


def test_a_huge_header_does_not_set_the_training_volume(tmp_path):
    from patchddm_fast.train.trainer import data_volume_edge
    huge = _case(tmp_path, "Case_001")
    good = _case(tmp_path, "Case_002", seed=1)
    _claim_grid(huge.files["t1"], (1500, 1500, 1500))
    assert data_volume_edge([huge, good], 1) == 16


def test_a_header_within_limits_but_without_its_voxels_is_truncated(tmp_path, monkeypatch):
    case = _case(tmp_path)
    for kind in KINDS:
        _claim_grid(case.files[kind], (64, 64, 64))
    with pytest.raises(CaseError, match="Case_001_t1.nii.gz: it is truncated"):
        load_case(case)
    monkeypatch.setattr(nifti_module, "MAX_VOXELS", 1000)  # the limit is the module's
    with pytest.raises(CaseError, match="more than the 1,000"):
        load_case(case)


# -- 7. case folders that are symbolic links are followed ---------------------------------------

def test_symlinked_case_folders_are_followed(tmp_path):
    store, data = tmp_path / "store", tmp_path / "data"
    for number in (1, 2):
        write_case(store, f"Case_00{number}", shape=SHAPE, seed=number)
    data.mkdir()
    for number in (1, 2):
        (data / f"Case_00{number}").symlink_to(store / f"Case_00{number}", target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # must not scan forever
    (data / "gone").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    cases, report = find_cases(data)
    assert [c.case_id for c in cases] == ["Case_001", "Case_002"]
    assert report.errors == [] and report.n_found == 2
    assert "gone" in report.format() and "symbolic link to nothing" in report.format()
    load_case(cases[0])
    # The store itself, and a link to one of its cases beside them: one case, not a duplicate.
    for name in ("again", "0_first"):  # after and before Case_001 in the order of the scan
        (store / name).symlink_to(store / "Case_001", target_is_directory=True)
    cases, report = find_cases(store)
    assert [c.case_id for c in cases] == ["Case_001", "Case_002"] and report.problems == []
    assert cases[0].folder == store / "Case_001"


# -- 8. a failed write leaves no partial file ---------------------------------------------------

def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "Case_001_mask.nii.gz"
    write_nifti(target, np.zeros(SHAPE, np.uint8), np.eye(4))
    before = target.read_bytes()
    monkeypatch.setattr(nifti_module.os, "replace", _full_disk)
    with pytest.raises(OSError, match="(?i)" + re.escape(str(target)) + ".*no space left") as caught:
        write_nifti(target, np.ones(SHAPE, np.uint8), np.eye(4))
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no .partial
    assert target.read_bytes() == before  # the earlier file is untouched


def test_a_full_disk_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = nib.save

    def save_half(image, filename):  # writes a part of the file, then the disk is full
        real_save(image, filename)
        with open(filename, "r+b") as f:
            f.truncate(100)
        _full_disk()

    monkeypatch.setattr(nifti_module.nib, "save", save_half)
    target = tmp_path / "Case_001_mean.nii.gz"
    with pytest.raises(OSError, match=re.escape(str(target))):
        write_nifti(target, np.zeros(SHAPE, np.float32), np.eye(4))
    assert list(tmp_path.iterdir()) == []

    def interrupted(image, filename):
        real_save(image, filename)
        raise KeyboardInterrupt

    monkeypatch.setattr(nifti_module.nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(target, np.zeros(SHAPE, np.float32), np.eye(4))
    assert list(tmp_path.iterdir()) == []


# -- 10. duplicate case ids, and the tumour count of the log -----------------------------------

def test_a_duplicate_case_id_is_an_error_naming_both_folders(tmp_path):
    write_case(tmp_path / "a", "Case_001", shape=SHAPE)
    write_case(tmp_path / "b", "Case_001", shape=SHAPE, seed=1)
    write_case(tmp_path / "b", "Case_002", shape=SHAPE, seed=2)
    cases, report = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Case_002"]
    assert report.failed_cases == ["Case_001"]
    (problem,) = report.errors
    assert str(tmp_path / "a" / "Case_001") in problem.message
    assert str(tmp_path / "b" / "Case_001") in problem.message
    assert report.summary().startswith("2 case(s) found: 1 usable, 1 with errors")


def test_the_logged_tumour_count_excludes_the_padding(tmp_path, monkeypatch):
    from patchddm_fast.diffusion.full_volume import SegmentationResult
    from patchddm_fast.inference import SamplingSettings, Segmenter, sample_folder
    from patchddm_fast.nn import UNet3D, UNetConfig, save_checkpoint

    write_case(tmp_path / "data", "Case_001", shape=(12, 10, 8))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(UNet3D(UNetConfig(model_channels=4, channel_mult=(1, 2), num_res_blocks=1)), checkpoint,
                    volume_shape=[16, 16, 16], patch_shape=[16, 16, 16])

    def everywhere(self, prepared, **kwargs):  # a model that calls every voxel tumour, padding too
        shape = prepared.image.shape[1:]
        return SegmentationResult(torch.ones(shape), torch.ones(shape, dtype=torch.bool), torch.zeros(shape), [0],
                                  None)

    monkeypatch.setattr(Segmenter, "segment", everywhere)
    lines = []
    report = sample_folder(checkpoint, tmp_path / "data", tmp_path / "out", SamplingSettings(steps=1, ensemble=1),
                           device="cpu", montage=False, progress=False, log=lines.append)
    assert len(report.succeeded) == 1
    written = np.asanyarray(nib.load(str(tmp_path / "out" / "Case_001_mask.nii.gz")).dataobj)
    assert written.sum() == 12 * 10 * 8
    assert any(f"{12 * 10 * 8} tumour voxels" in line for line in lines), lines
