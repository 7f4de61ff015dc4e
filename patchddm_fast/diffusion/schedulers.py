"""DDPM and DDIM schedulers with the interface known from diffusers and MONAI, on the fused ops.

    scheduler = DDIMScheduler(eta=0.0)
    scheduler.set_timesteps(20)
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, t)
        x, x0 = scheduler.step(eps, t, x, seed=seed, offset=(i + 1) * x.numel())

`step` returns a StepOutput, a named tuple (prev_sample, pred_x0): it unpacks like MONAI's
tuple and has diffusers' attribute names (`.prev_sample`, `.pred_original_sample`). The update
runs as one fused pass (patchddm_fast.ops.ddim_step / ddpm_step) that can write straight into
a caller's buffer (`out=`, e.g. the x_t channel of the model input). Noise, where a step draws
any, comes from the in-kernel Philox generator keyed by (seed, offset): a run is reproduced by
its seed, and advancing the offset by the number of elements per step never reuses noise.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..ops import ddim_step, ddpm_step, q_sample
from .schedule import NoiseSchedule

SPACINGS = ("linspace", "leading", "trailing")
# What the network predicts (diffusers' names): the noise (the original PatchDDM), x0 itself,
# or v = sqrt(ab) noise - sqrt(1 - ab) x0 (Salimans and Ho 2022).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def predicted_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: float, prediction_type: str,
                    clip_sample: bool) -> torch.Tensor:
    """The noise implied by a prediction of `prediction_type` at x_t = sample.

    The fused update kernels take the noise; x0 and v predictions are turned into it here.
    x0 is clipped first when clip_sample is set, so that the kernel's own clip sees the same
    x0 (up to rounding magnified by 1 / sqrt(alpha_bar)).
    """
    if prediction_type == "epsilon":
        return model_output
    a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    x_t, out = sample.to(acc), model_output.to(acc)
    if prediction_type == "sample":
        x0 = out.clamp(-1, 1) if clip_sample else out
        return ((x_t - a * x0) / s).to(sample.dtype)
    return (s * x_t + a * out).to(sample.dtype)  # v: eps = sqrt(1 - ab) x_t + sqrt(ab) v


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_x0: torch.Tensor

    @property
    def pred_original_sample(self) -> torch.Tensor:  # diffusers' name
        return self.pred_x0


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The descending integer timesteps of a sampler with num_inference_steps steps.

    linspace: round(linspace(T-1, 0, n)), rounding half to even (the original PatchDDM DDIM);
    leading:  arange(n) * (T // n), reversed (diffusers' default);
    trailing: round(arange(T, 0, -T / n)) - 1.
    """
    T, n = num_train_timesteps, num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
    if spacing == "linspace":
        steps = np.round(np.linspace(T - 1, 0, n))
    elif spacing == "leading":
        steps = (np.arange(n) * (T // n))[::-1]
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return steps.astype(np.int64)


class _Scheduler:
    """What DDPM and DDIM share: the schedule, the timesteps, add_noise."""

    def __init__(self, schedule: NoiseSchedule | None, num_train_timesteps: int, beta_schedule: str,
                 clip_sample: bool, timestep_spacing: str, prediction_type: str = "epsilon"):
        if schedule is None:
            schedule = NoiseSchedule.from_name(beta_schedule, num_train_timesteps)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        self.schedule = schedule
        self.clip_sample = bool(clip_sample)
        self.prediction_type = check_prediction_type(prediction_type)
        self.timestep_spacing = timestep_spacing
        self.set_timesteps(schedule.num_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule.alphas_cumprod

    def set_timesteps(self, num_inference_steps: int, device=None) -> "_Scheduler":
        """Chooses the timesteps of sampling (1 to T of them); returns self for chaining."""
        steps = inference_timesteps(self.num_train_timesteps, num_inference_steps, self.timestep_spacing)
        self.num_inference_steps = len(steps)
        self.timesteps = torch.from_numpy(steps).to(device)
        # each step goes to the next timestep of the list; the last one to "before t = 0" (-1)
        self._previous = dict(zip(steps.tolist(), steps[1:].tolist() + [-1]))
        return self

    def previous_timestep(self, timestep) -> int:
        t = int(timestep)
        if t not in self._previous:
            raise ValueError(f"{type(self).__name__}.step: timestep {t} is not one of the "
                             f"{self.num_inference_steps} timesteps chosen by set_timesteps")
        return self._previous[t]

    def _final_alpha_bar(self) -> float:
        return 1.0

    def _alpha_bars(self, timestep) -> tuple[float, float]:
        t = int(timestep)
        prev = self.previous_timestep(t)
        ab_prev = self._final_alpha_bar() if prev < 0 else float(self.alphas_cumprod[prev])
        return float(self.alphas_cumprod[t]), ab_prev

    def _noise(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        return predicted_noise(_like(model_output, sample), sample, alpha_bar, self.prediction_type, self.clip_sample)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM/DDIM do not scale the input); here for interface compatibility."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None, timesteps, *,
                  seed: int | None = None, offset: int = 0) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, per batch element.

        timesteps: an int or B integers. noise: a tensor like original_samples, or None to draw
        it inside the fused kernel (patchddm_fast.ops.q_sample) from (seed, offset): then
        add_noise(x0, None, t, seed=s) == add_noise(x0, philox_normal(x0.shape, s), t).
        """
        ab = self.schedule.alpha_bar(timesteps).reshape(-1)
        if noise is None:
            return q_sample(original_samples, ab, seed=seed, offset=offset, return_noise=False)
        if noise.shape != original_samples.shape:
            raise ValueError(f"add_noise: noise has shape {tuple(noise.shape)}, expected "
                             f"{tuple(original_samples.shape)} like original_samples")
        batch = original_samples.shape[0]
        if ab.numel() not in (1, batch):
            raise ValueError(f"add_noise: {ab.numel()} timesteps for a batch of {batch}")
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        acc = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
        sqrt_ab = ab.sqrt().to(device=original_samples.device, dtype=acc).reshape(view)
        sqrt_1m = (1 - ab).sqrt().to(device=original_samples.device, dtype=acc).reshape(view)
        x_t = sqrt_ab * original_samples.to(acc) + sqrt_1m * noise.to(acc)
        return x_t.to(original_samples.dtype)

    @staticmethod
    def _seed(seed, generator):
        if seed is None and generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return seed


class DDPMScheduler(_Scheduler):
    """Ancestral sampling (Ho et al. 2020): x_{t_prev} ~ q(x_{t_prev} | x_t, x0_pred).

    With fewer inference steps than training steps, each step uses the effective beta
    1 - alpha_bar_t / alpha_bar_prev of its jump. variance_type: "fixed_small" (the posterior
    variance) or "fixed_large" (beta). The last step returns the predicted x0 without noise.
    """

    def __init__(self, schedule: NoiseSchedule | None = None, *, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", clip_sample: bool = True,
                 variance_type: str = "fixed_small", timestep_spacing: str = "linspace",
                 prediction_type: str = "epsilon"):
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
        self.variance_type = variance_type
        super().__init__(schedule, num_train_timesteps, beta_schedule, clip_sample, timestep_spacing,
                         prediction_type)

    @property
    def draws_noise(self) -> bool:
        return True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, seed: int | None = None,
             offset: int = 0, generator: torch.Generator | None = None, out: torch.Tensor | None = None,
             x0_out: torch.Tensor | None = None) -> StepOutput:
        """One step from `sample` (x_t) at `timestep` given the network's `model_output` (the
        noise, x0 or v, as prediction_type says).

        The noise z is Philox noise keyed by (seed, offset); seed None: drawn from `generator`
        (or torch's default generator). out / x0_out: tensors (any strides) to write into.
        """
        ab_t, ab_prev = self._alpha_bars(timestep)
        prev, x0 = ddpm_step(sample, self._noise(model_output, sample, ab_t), ab_t, ab_prev, clip=self.clip_sample,
                             variance=self.variance_type, seed=self._seed(seed, generator), offset=offset,
                             out=out, x0_out=x0_out)
        return StepOutput(prev, x0)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) with stochasticity eta (0: deterministic, 1: DDPM-like).

    set_alpha_to_one: what the last step (t = timesteps[-1]) goes to: alpha_bar = 1 when True
    (diffusers' default), alpha_bar[0] when False (the original PatchDDM sampler, the default
    here). clip_sample clamps the predicted x0 to [-1, 1] and re-derives the noise from it.
    """

    def __init__(self, schedule: NoiseSchedule | None = None, *, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", eta: float = 0.0, clip_sample: bool = True,
                 set_alpha_to_one: bool = False, timestep_spacing: str = "linspace",
                 prediction_type: str = "epsilon"):
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        super().__init__(schedule, num_train_timesteps, beta_schedule, clip_sample, timestep_spacing,
                         prediction_type)

    def _final_alpha_bar(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, eta: float | None = None,
             seed: int | None = None, offset: int = 0, generator: torch.Generator | None = None,
             out: torch.Tensor | None = None, x0_out: torch.Tensor | None = None) -> StepOutput:
        """One DDIM step from `sample` (x_t) at `timestep` given the network's output (the
        noise, x0 or v, as prediction_type says).

        eta overrides the scheduler's for this step. Noise (eta > 0 only) as DDPMScheduler.step.
        """
        eta = self.eta if eta is None else float(eta)
        ab_t, ab_prev = self._alpha_bars(timestep)
        seed = self._seed(seed, generator) if eta > 0 else None
        prev, x0 = ddim_step(sample, self._noise(model_output, sample, ab_t), ab_t, ab_prev, eta=eta, clip=self.clip_sample,
                             seed=seed, offset=offset, out=out, x0_out=x0_out)
        return StepOutput(prev, x0)



def _like(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The model's prediction in the sample's dtype (autocast returns bf16/fp16 outputs)."""
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but the sample has shape "
                         f"{tuple(sample.shape)}; the model must predict the noise of every sample voxel")
    return model_output if model_output.dtype == sample.dtype else model_output.to(sample.dtype)
