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

from .layout import (LABEL, SEQUENCES, CaseError, CaseFiles, DataError, DatasetReport, Problem, find_cases,
                     sequence_of)
from .loader import PAPER_PATCH, PatchDataset, VolumeCache, make_patch_loader
from .nifti import BRATS_LABELS, MAX_VOXELS, RawCase, load_case, read_header, write_nifti
from .patches import PatchSample, StreamSampler, offset_ranges, sample_offset
from .phantoms import PhantomConfig, generate_phantom, write_phantoms
from .preprocess import (PAPER_VOLUME, CaseMeta, Padding, PreparedCase, normalise_sequence, prepare_case,
                         prepare_raw)
from .regions import REGIONS, brats_regions, whole_tumour
from .split import Split, make_split, paper_split, split_cases

__all__ = [
    "BRATS_LABELS", "LABEL", "MAX_VOXELS", "PAPER_PATCH", "PAPER_VOLUME", "REGIONS", "SEQUENCES", "CaseError",
    "CaseFiles", "CaseMeta", "DataError", "DatasetReport", "Padding", "PatchDataset", "PatchSample",
    "PhantomConfig", "PreparedCase", "Problem", "RawCase", "Split", "StreamSampler", "VolumeCache",
    "brats_regions", "find_cases", "generate_phantom", "load_case", "make_patch_loader", "make_split",
    "normalise_sequence", "offset_ranges", "paper_split", "prepare_case", "prepare_raw", "read_header",
    "sample_offset", "sequence_of", "split_cases", "whole_tumour", "write_nifti", "write_phantoms",
]
