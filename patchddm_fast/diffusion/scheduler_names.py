"""Schedulers by name, as `patchddm sample --scheduler ddim|ddpm|dpmsolver++` chooses them."""

from __future__ import annotations

from .dpm_solver import DPMSolverMultistepScheduler
from .schedule import NoiseSchedule
from .schedulers import DDIMScheduler, DDPMScheduler

SCHEDULER_NAMES = ("ddim", "ddpm", "dpmsolver++")


def make_scheduler(name: str, schedule: NoiseSchedule, steps: int, *, eta: float = 0.0,
                   prediction_type: str = "epsilon"):
    """The scheduler `name` on a model's schedule, in the PatchDDM form, with `steps` steps.

    ddim: the original PatchDDM sampler (its spacing, the last step to alpha_bar[0], x0
    clipped), eta its stochasticity; ddpm: ancestral sampling on the same spacing;
    dpmsolver++: DPM-Solver++(2M), diffusers' spacing, x0 clipped, landing on x0. eta applies
    to ddim only.
    """
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}, got {name!r}")
    if name != "ddim" and eta != 0:
        raise ValueError(f"eta applies to the ddim scheduler only; got eta={eta} with {name!r}")
    if name == "ddim":
        scheduler = DDIMScheduler(schedule, eta=eta, prediction_type=prediction_type)
    elif name == "ddpm":
        scheduler = DDPMScheduler(schedule, prediction_type=prediction_type)
    else:
        scheduler = DPMSolverMultistepScheduler(schedule, prediction_type=prediction_type)
    return scheduler.set_timesteps(steps)
