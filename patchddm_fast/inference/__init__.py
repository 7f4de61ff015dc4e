"""Segmenting cases with a trained model and writing the results as NIfTI files.

For each case: read and preprocess it onto the model's volume grid (the grid it was trained
on, recorded in the checkpoint), sample an ensemble of segmentations of the whole volume with
FullVolumeSampler, and write, on the case's original grid with its affine and header:

    <case_id>_mask.nii.gz          uint8, 1 = tumour: the ensemble mean thresholded at 0.5
    <case_id>_mean.nii.gz          float32, the ensemble mean
    <case_id>_uncertainty.nii.gz   float32, the per-voxel standard deviation across the ensemble
    <case_id>_montage.png          slices through the tumour (patchddm_fast.visualize)

A case that cannot be read or sampled is reported and the others go on; every file is written
under a temporary name and renamed, so an interrupted or failing run never leaves a half-written
file and never touches the outputs of other cases. Each case's seed is derived from the run's
seed and its case id, so a case gets the same result whichever other cases are in the folder.

model: loading a checkpoint for sampling; segmenter: settings, seeds, the ensemble sampler;
outputs: the files of a case; run_log: sampling.json; folder: a folder of cases.
"""

from .folder import CaseOutcome, SampleReport, sample_folder
from .model import IMAGE_CHANNELS, MODEL_IN_CHANNELS, LoadedModel, load_model
from .outputs import OUTPUT_KINDS, output_path, truth_mask, write_case_outputs
from .run_log import RUN_LOG
from .segmenter import SamplingSettings, Segmenter, case_seed

__all__ = [
    "IMAGE_CHANNELS", "MODEL_IN_CHANNELS", "OUTPUT_KINDS", "RUN_LOG", "CaseOutcome", "LoadedModel", "SampleReport",
    "SamplingSettings", "Segmenter", "case_seed", "load_model", "output_path", "sample_folder", "truth_mask",
    "write_case_outputs",
]
