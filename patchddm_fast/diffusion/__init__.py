"""Diffusion for PatchDDM: noise schedules, the training loss, DDPM/DDIM schedulers and
samplers (including the original PatchDDM DDIM, reproduced exactly), and the full-volume
ensemble sampler with uncertainty maps. Every noise update runs through the fused ops of
patchddm_fast.ops (ddim_step, ddpm_step, q_sample), writing into preallocated buffers.
"""

from .full_volume import FullVolumeSampler, SegmentationResult, member_seeds
from .loss import LossOutput, diffusion_loss, model_input_buffer, sample_timesteps
from .plan import PlanOptions, SamplingPlan, VolumeTooLargeError
from .sampling import ddim_sample, ddpm_sample, denoise, original_ddim_sample, sample_loop
from .schedule import NoiseSchedule
from .schedulers import PREDICTION_TYPES, DDIMScheduler, DDPMScheduler, StepOutput, inference_timesteps

__all__ = [
    "DDIMScheduler", "DDPMScheduler", "FullVolumeSampler", "LossOutput", "NoiseSchedule", "PREDICTION_TYPES", "PlanOptions", "SamplingPlan",
    "SegmentationResult", "StepOutput", "VolumeTooLargeError", "ddim_sample", "ddpm_sample", "denoise",
    "diffusion_loss", "inference_timesteps", "member_seeds", "model_input_buffer", "original_ddim_sample",
    "sample_loop", "sample_timesteps",
]
