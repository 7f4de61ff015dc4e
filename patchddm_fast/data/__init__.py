"""BraTS data for PatchDDM: finding and reading cases (with real releases' quirks), the paper's
preprocessing and split, centre-biased patches assembled into the model input, a shared volume
cache and DataLoader, and synthetic phantoms.

Typical use (training):

    cases, report = find_cases("BraTS2020_TrainingData")       # report lists per-case problems
    parts = split_cases(cases)                                   # the paper's 295 / 37 / 37
    dataset = PatchDataset(parts["train"], patch_shape=128, volume_shape=256, seed=0)
    loader = make_patch_loader(dataset, batch_size=2, num_workers=4, start=samples_done)
    for batch in loader:                                          # endless; batch.input (B, 8, p, p, p)
        ...

Full volumes for sampling: `prepare_case(case)` gives the padded image and a meta that writes
outputs back on the case's original grid (`prepared.meta.save(path, volume)`).
"""

# The user-facing names; the rest (sequence names, patch sampling, split internals) stay in
# their modules (e.g. patchddm_fast.data.patches.sample_offset).
from .layout import CaseError, CaseFiles, DataError, DatasetReport, find_cases
from .loader import PAPER_PATCH, PatchDataset, make_patch_loader
from .nifti import RawCase, load_case, write_nifti
from .phantoms import generate_phantom, write_phantoms
from .preprocess import PAPER_VOLUME, CaseMeta, PreparedCase, prepare_case, prepare_raw
from .regions import brats_regions, whole_tumour
from .split import split_cases

__all__ = [
    "PAPER_PATCH", "PAPER_VOLUME", "CaseError", "CaseFiles", "CaseMeta", "DataError", "DatasetReport",
    "PatchDataset", "PreparedCase", "RawCase", "brats_regions", "find_cases", "generate_phantom", "load_case",
    "make_patch_loader", "prepare_case", "prepare_raw", "split_cases", "whole_tumour", "write_nifti",
    "write_phantoms",
]
