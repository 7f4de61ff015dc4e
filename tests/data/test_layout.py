"""Finding cases: both layouts, the naming quirks of real releases, per-case problem reports."""

import pytest

from patchddm_fast.data import DataError, find_cases
from patchddm_fast.data.layout import case_number, sequence_of


@pytest.mark.parametrize("name, kind", [
    ("BraTS20_Training_001_t1.nii.gz", "t1"),
    ("BraTS20_Training_001_t1ce.nii.gz", "t1ce"),
    ("BraTS20_Training_001_t2.nii", "t2"),
    ("BraTS20_Training_001_flair.NII.GZ", "flair"),
    ("BraTS20_Training_001_seg.nii.gz", "seg"),
    ("BraTS20_Training_001_Seg.nii.gz", "seg"),
    ("BraTS20_Training_001_segmentation.nii", "seg"),
    ("W39_1998.09.19_Segm.nii", "seg"),  # BraTS20_Training_355's segmentation
    ("brats_train_007_t1ce_123_w.nii.gz", "t1ce"),
    ("brats_train_007_seg_000_w.nii.gz", "seg"),
    ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),  # BraTS2023 names
    ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"),
    ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"),
    ("case_t1_ce.nii.gz", "t1ce"),
    ("case_t2_flair.nii.gz", "flair"),
    ("BraTS20_Training_001_t1.txt", None),
    ("notes.nii.gz.bak", None),
    ("BraTS20_Training_001_brainmask_extra.nii.gz", None),
])
def test_sequence_of_names(name, kind):
    assert sequence_of(name) == kind


def test_case_numbers():
    assert case_number("BraTS20_Training_042") == 42
    assert case_number("000369") == 369
    assert case_number("patient") is None


def test_brats_layout(tmp_path, make_case):
    for i in (3, 1, 2):
        make_case(f"BraTS20_Training_{i:03d}")
    (tmp_path / "name_mapping.csv").write_text("not a case")
    cases, report = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert [c.number for c in cases] == [1, 2, 3]
    assert all(sorted(c.files) == ["flair", "seg", "t1", "t1ce", "t2"] for c in cases)
    assert report.problems == [] and report.n_found == 3


def test_original_layout(make_case, tmp_path):
    for number in (5, 12):
        names = {kind: f"brats_train_{number:03d}_{kind}_123_w.nii.gz" for kind in ("t1", "t1ce", "t2", "flair", "seg")}
        make_case(f"{number:06d}", names=names)
    cases, report = find_cases(tmp_path)
    assert [c.number for c in cases] == [5, 12]
    assert cases[1].files["t1ce"].name == "brats_train_012_t1ce_123_w.nii.gz"
    assert report.problems == []


def test_one_case_folder_is_a_dataset(make_case):
    folder = make_case("BraTS20_Validation_004", skip=("seg",))
    cases, report = find_cases(folder, with_label=False)
    assert [c.case_id for c in cases] == ["BraTS20_Validation_004"] and not cases[0].has_label
    assert report.problems == []


def test_quirks_are_handled_and_reported(make_case, tmp_path):
    make_case("BraTS20_Training_355", names={"seg": "W39_1998.09.19_Segm.nii"})
    make_case("BraTS20_Training_010",
              names={"seg": "BraTS20_Training_010_Seg.nii.gz", "t2": "BraTS20_Training_010_t2.nii"})
    make_case("BraTS20_Training_011", skip=("t1ce",))  # missing sequence
    make_case("BraTS20_Training_012", skip=("seg",))  # missing label
    extra = make_case("BraTS20_Training_013")
    t1_bytes = (extra / "BraTS20_Training_013_t1.nii.gz").read_bytes()
    (extra / "BraTS20_Training_013_brainmask.nii.gz").write_bytes(t1_bytes)
    (extra / "BraTS20_Training_013_t1.nii").write_bytes(b"a second t1")
    cases, report = find_cases(tmp_path)
    ids = [c.case_id for c in cases]
    assert ids == ["BraTS20_Training_010", "BraTS20_Training_013", "BraTS20_Training_355"]
    assert cases[2].files["seg"].name == "W39_1998.09.19_Segm.nii"
    assert cases[0].files["t2"].suffix == ".nii"
    assert cases[1].files["t1"].name == "BraTS20_Training_013_t1.nii.gz"  # the standard name wins
    assert report.failed_cases == ["BraTS20_Training_011", "BraTS20_Training_012"]
    text = report.format()
    assert "BraTS20_Training_011: error: missing t1ce" in text
    assert "BraTS20_Training_012: error: missing seg" in text
    assert "non-standard name: W39_1998.09.19_Segm.nii" in text
    assert "ignoring BraTS20_Training_013_brainmask.nii.gz" in text
    assert "2 files for t1" in text
    assert report.summary().startswith("5 case(s) found: 3 usable, 2 with errors")
    # Without labels required, the case without a segmentation is usable.
    cases, report = find_cases(tmp_path, with_label=False)
    assert "BraTS20_Training_012" in [c.case_id for c in cases]


def test_bad_roots(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        find_cases(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI files"):
        find_cases(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        find_cases(tmp_path / "file.txt")
