"""DPM-Solver++(2M) (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", on the fused DDIM update.

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(5)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample

The solver works in the data prediction x0(x_s) and the half log-SNR lambda = log(alpha / sigma)
(alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)). From s to t, with h = lambda_t - lambda_s:

    first order:  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D0          (= DDIM, eta = 0)
    second order: x_t = first order + c D1,  D1 = (x0_s - x0_prev) / r,  r = h_prev / h
                  c = alpha_t (1 - e^-h) / 2                  (solver_type "midpoint")
                  c = alpha_t ((e^-h - 1) / h + 1)            (solver_type "heun")

with D0 = x0_s. The first order update is exactly the DDIM step from alpha_bar_s to alpha_bar_t
with the noise re-derived from (the clipped) x0, so it runs as the fused ddim_step kernel;
the second order adds c D1 in one more pass. As in diffusers, the first step is first order
(no history yet), and so is the last when it goes to sigma = 0 (final_sigmas_type "zero",
where it returns x0) or when lower_order_final holds with fewer than 15 steps.

The scheduler keeps the previous step's x0, like diffusers: a run is one pass over
`timesteps` in order, on one batch. A step at timesteps[0] starts a new run; a step at any
other timestep than the next one raises ValueError (diffusers silently takes its counter).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops import ddim_step
from .schedule import NoiseSchedule
from .schedulers import SPACINGS, _like, _Scheduler, _timestep, inference_timesteps, \
    predicted_noise

SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers' settings this implementation fixes at their default; any other value is refused
_FIXED = {"algorithm_type": "dpmsolver++", "thresholding": False, "use_karras_sigmas": False,
          "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
          "use_flow_sigmas": False, "lambda_min_clipped": -float("inf"), "variance_type": None,
          "rescale_betas_zero_snr": False, "use_dynamic_shifting": False}


def dpm_solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "linspace",
                         steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler's timesteps: n + 1 points with the last (t = 0) dropped, as
    the final step goes to sigma = 0 or sigma_min instead.

    linspace: round(linspace(0, T - 1, n + 1)) reversed, without the 0 (diffusers' default);
    leading:  arange(n + 1) * (T // (n + 1)) reversed, without the 0, plus steps_offset;
    trailing: round(arange(T, 0, -T / n)) - 1 (as DDIM's);
    patchddm: round(linspace(T - 1, 0, n)) (the original PatchDDM list, t = 0 included).
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing in ("trailing", "patchddm"):
        return inference_timesteps(T, n, spacing, steps_offset)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    steps = steps.astype(np.int64)
    if len(np.unique(steps)) != len(steps) or steps[0] >= T:
        raise ValueError(f"timestep_spacing={spacing!r} gives repeated or out-of-range timesteps for "
                         f"{n} steps of {T} (steps_offset={steps_offset}): choose fewer steps")
    return steps


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++ multistep, order 1 or 2 (2M by default), deterministic.

    Constructor arguments are diffusers' (those it fixes, e.g. algorithm_type="dpmsolver++",
    are accepted at that value only), plus clip_sample: clamp each x0 prediction to [-1, 1]
    (the original PatchDDM clips; diffusers has no such option, so it is False in the diffusers
    form and True in the PatchDDM form, DPMSolverMultistepScheduler(schedule)).
    final_sigmas_type: "zero" (the last step lands on x0) or "sigma_min" (on alpha_bar[0]).
    """

    _spacings = SPACINGS
    _diffusers_defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                               trained_betas=None, solver_order=2, prediction_type="epsilon",
                               solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                               final_sigmas_type="zero", timestep_spacing="linspace", steps_offset=0,
                               clip_sample=False)
    _patchddm_defaults = dict(clip_sample=True)

    def __init__(self, schedule: NoiseSchedule | None = None, *, num_train_timesteps: int | None = None,
                 beta_start: float | None = None, beta_end: float | None = None, beta_schedule: str | None = None,
                 trained_betas=None, solver_order: int | None = None, prediction_type: str | None = None,
                 solver_type: str | None = None, lower_order_final: bool | None = None,
                 euler_at_final: bool | None = None, final_sigmas_type: str | None = None,
                 timestep_spacing: str | None = None, steps_offset: int | None = None,
                 clip_sample: bool | None = None, **fixed):
        settings = dict(locals())
        for name in ("self", "schedule", "__class__", "fixed"):
            settings.pop(name, None)
        for name, value in fixed.items():
            if name not in _FIXED:
                raise TypeError(f"DPMSolverMultistepScheduler got an unexpected keyword argument {name!r}")
            same = value == _FIXED[name] or (value is None and _FIXED[name] is None)
            if not same:
                raise ValueError(f"DPMSolverMultistepScheduler: {name}={value!r} is not supported (only "
                                 f"{_FIXED[name]!r})")
        order = settings["solver_order"]
        if order is not None and (isinstance(order, bool) or order not in (1, 2)):
            raise ValueError(f"solver_order must be 1 or 2 (DPM-Solver++ 1 / 2M), got {order!r}")
        if settings["solver_type"] not in (None,) + SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {settings['solver_type']!r}")
        if settings["final_sigmas_type"] not in (None,) + FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got "
                             f"{settings['final_sigmas_type']!r}")
        self._x0_prev = None
        self._setup(schedule, settings)
        if self.config.timestep_spacing == "patchddm" and self.config.final_sigmas_type == "sigma_min":
            raise ValueError("DPMSolverMultistepScheduler: timestep_spacing='patchddm' ends at t = 0, which is "
                             "already sigma_min; use final_sigmas_type='zero' with it")

    @property
    def draws_noise(self) -> bool:
        return False

    def _timestep_list(self, n: int) -> np.ndarray:
        return dpm_solver_timesteps(self.num_train_timesteps, n, self.config.timestep_spacing,
                                    self.config.steps_offset)

    def _reset(self) -> None:
        self._step_index = None
        self._x0_prev = None
        self.lower_order_nums = 0
        ab = self.alphas_cumprod[torch.as_tensor(self._listed, dtype=torch.int64)]
        ab0 = float(self.alphas_cumprod[0])
        final = 0.0 if self.config.final_sigmas_type == "zero" else math.sqrt((1 - ab0) / ab0)
        # diffusers' sigmas (sqrt((1 - ab) / ab) at each timestep, then the final one), float32
        self.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.tensor([final], dtype=torch.float64)]).float()

    @property
    def step_index(self):
        return self._step_index

    def _alpha_bar_at(self, index: int) -> float:
        if index < len(self._listed):
            return float(self.alphas_cumprod[self._listed[index]])
        return 1.0 if self.config.final_sigmas_type == "zero" else float(self.alphas_cumprod[0])

    def _index(self, t: int) -> int:
        """The step index of a call at t: the counter, restarted at timesteps[0]."""
        if self._step_index is None or t == self._listed[0]:
            if t not in self._listed:
                raise ValueError(f"DPMSolverMultistepScheduler.step: timestep {t} is not one of the "
                                 f"{self.num_inference_steps} timesteps chosen by set_timesteps")
            if self._step_index is not None:
                self._reset()  # a new run
            return self._listed.index(t)
        k = self._step_index
        if k >= len(self._listed) or self._listed[k] != t:
            expected = "none (the run is over)" if k >= len(self._listed) else f"{self._listed[k]} (step {k})"
            raise ValueError(f"DPMSolverMultistepScheduler.step: got timestep {t}, expected {expected}; a "
                             f"multistep solver runs the timesteps in order, one batch per run (a step at "
                             f"timesteps[0] = {self._listed[0]} starts a new run)")
        return k

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise=None, return_dict: bool = True, *, seed: int | None = None, offset: int | None = None,
             member: int = 0, out: torch.Tensor | None = None, x0_out: torch.Tensor | None = None):
        """One DPM-Solver++ step from `sample` at `timestep` to the next listed timestep (or to
        the final sigma), given the network's output (noise, x0 or v, as prediction_type says).

        Deterministic: generator, variance_noise, seed, offset and member are accepted for a
        common interface and not used. out / x0_out: tensors to write into. Returns a
        StepOutput (prev_sample, pred_original_sample); return_dict=False: (prev_sample,) as
        diffusers.
        """
        model_output = _like(model_output, sample)
        t = _timestep(timestep, self.num_train_timesteps)
        k = self._index(t)
        n = self.num_inference_steps
        ab_s, ab_t = self._alpha_bar_at(k), self._alpha_bar_at(k + 1)
        cfg = self.config
        last_first_order = k == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                           or cfg.final_sigmas_type == "zero")
        second = cfg.solver_order == 2 and self.lower_order_nums >= 1 and not last_first_order
        clip = bool(cfg.clip_sample)
        eps = predicted_noise(model_output, sample, ab_s, cfg.prediction_type, clip)
        # the correction needs the previous x0 after the kernel has written this one, and
        # x0_out may be the caller's buffer of the previous step: keep our own copy
        prev_sample, x0 = ddim_step(sample, eps, ab_s, ab_t, eta=0.0, clip=clip, out=out, x0_out=x0_out)
        if second:
            lam = lambda ab: 0.5 * math.log(ab / (1 - ab))  # noqa: E731
            h = lam(ab_t) - lam(ab_s)
            r = (lam(ab_s) - lam(self._alpha_bar_at(k - 1))) / h
            alpha_t = math.sqrt(ab_t)
            if cfg.solver_type == "midpoint":
                c = 0.5 * alpha_t * -math.expm1(-h)
            else:
                c = alpha_t * (math.expm1(-h) / h + 1.0)
            prev_sample.add_(x0 - self._x0_prev, alpha=c / r)
        if self._x0_prev is None or self._x0_prev.shape != x0.shape or self._x0_prev.dtype != x0.dtype \
                or self._x0_prev.device != x0.device:
            self._x0_prev = x0.clone()
        else:
            self._x0_prev.copy_(x0)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample,)
        return self._finish(prev_sample, x0, None, None, True)


__all__ = ["DPMSolverMultistepScheduler", "dpm_solver_timesteps"]
