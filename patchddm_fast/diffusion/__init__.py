"""Diffusion for PatchDDM: noise schedules, the training loss, DDPM/DDIM schedulers and
samplers (including the original PatchDDM DDIM, reproduced exactly), DPM-Solver++, and the
full-volume ensemble sampler with uncertainty maps. Every noise update runs through the fused ops of
patchddm_fast.ops (ddim_step, ddpm_step, q_sample), writing into preallocated buffers.
"""

from .dpm_solver import DPMSolverMultistepScheduler, dpm_solver_timesteps
from .full_volume import FullVolumeSampler, SegmentationResult, member_seeds
from .loss import LossOutput, diffusion_loss, model_input_buffer, sample_timesteps
from .plan import PlanOptions, SamplingPlan, VolumeTooLargeError
from .sampling import ddim_sample, ddpm_sample, denoise, original_ddim_sample, sample_loop
from .schedule import NoiseSchedule
from .scheduler_names import SCHEDULER_NAMES, make_scheduler
from .schedulers import (PREDICTION_TYPES, SPACINGS, DDIMScheduler, DDPMScheduler, SchedulerConfig, StepOutput,
                         default_offset, inference_timesteps)

__all__ = [
    "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "FullVolumeSampler", "LossOutput",
    "NoiseSchedule", "PREDICTION_TYPES", "PlanOptions", "SCHEDULER_NAMES", "SPACINGS", "SamplingPlan",
    "SchedulerConfig", "SegmentationResult", "StepOutput", "VolumeTooLargeError", "ddim_sample", "ddpm_sample",
    "default_offset", "denoise", "diffusion_loss", "dpm_solver_timesteps", "inference_timesteps", "make_scheduler",
    "member_seeds", "model_input_buffer", "original_ddim_sample", "sample_loop", "sample_timesteps",
]
