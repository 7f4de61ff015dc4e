"""DDPM and DDIM schedulers with diffusers' interface (and MONAI's tuple), on the fused ops.

Written as a diffusers user writes it:

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, eta=0.0).prev_sample

Constructed from diffusers' keyword arguments, a scheduler takes diffusers' defaults and gives
diffusers' timesteps and updates (tests/diffusion/test_diffusers_parity.py checks this against
diffusers itself). Constructed from a NoiseSchedule as first argument, the PatchDDM form
`DDIMScheduler(schedule, eta=0.0)`, the unspecified settings are those of the original PatchDDM
sampler instead: timestep_spacing="patchddm" (round(linspace(T - 1, 0, S)), half to even, each
step going to the next listed timestep), set_alpha_to_one=False (the last step goes to
alpha_bar[0]) and use_clipped_model_output=True (the noise re-derived from the clipped x0).

`step` returns a StepOutput: `.prev_sample` / `.pred_original_sample` by attribute, key
(`out["prev_sample"]`) and index (`out[0]`), and it unpacks like MONAI's tuple
(`prev, x0 = out`). The update runs as one fused pass (patchddm_fast.ops.ddim_step /
ddpm_step) that can write straight into a caller's buffer (`out=`, e.g. the x_t channel of the
model input); diffusers' default DDIM (x0 clipped, the model's noise kept) adds one pass that
moves the result by the clipping.

Noise comes from one of: `seed` (or none given: a seed drawn from torch's generator), the
in-kernel Philox generator keyed by (seed, offset); `generator`, drawn as diffusers draws it,
so the same generator state gives diffusers' noise; `variance_noise`, a tensor. The last two,
and the few settings the kernels do not cover (clip_sample_range other than 1, an x0 or v
prediction clipped without re-deriving the noise, fixed_large noise on a last step at t > 0),
run the update as a few PyTorch ops in the sample's precision. The default Philox offset follows
the timestep and the ensemble member (`default_offset`), so one seed for a whole run draws fresh
noise at every step and for every member, and the same seed reproduces the run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import numpy as np
import torch

from ..ops import ddim_step, ddpm_step, philox_normal, q_sample
from .schedule import NoiseSchedule

DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")
SPACINGS = DIFFUSERS_SPACINGS + ("patchddm",)
# What the network predicts (diffusers' names): the noise (the original PatchDDM), x0 itself,
# or v = sqrt(ab) noise - sqrt(1 - ab) x0 (Salimans and Ho 2022).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


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
    acc = _acc(sample)
    x_t, out = sample.to(acc), model_output.to(acc)
    if prediction_type == "sample":
        x0 = out.clamp(-1, 1) if clip_sample else out
        return ((x_t - a * x0) / s).to(sample.dtype)
    return (s * x_t + a * out).to(sample.dtype)  # v: eps = sqrt(1 - ab) x_t + sqrt(ab) v


def predicted_x0_and_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: float,
                           prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) implied by a prediction at x_t = sample, in the accumulation dtype, each by
    its direct formula (diffusers' arithmetic)."""
    a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    acc = _acc(sample)
    x_t, out = sample.to(acc), model_output.to(acc)
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "sample":
        return out, (x_t - a * out) / s
    return a * x_t - s * out, a * out + s * x_t


class StepOutput(tuple):
    """(prev_sample, pred_original_sample): by attribute, by key and by index, and it unpacks
    as a tuple. `pred_x0` is the older name of pred_original_sample."""

    __slots__ = ()
    _fields = ("prev_sample", "pred_original_sample")

    def __new__(cls, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None = None):
        return super().__new__(cls, (prev_sample, pred_original_sample))

    prev_sample = property(lambda self: tuple.__getitem__(self, 0))
    pred_original_sample = property(lambda self: tuple.__getitem__(self, 1))
    pred_x0 = pred_original_sample

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self):
        return self._fields

    def values(self):
        return tuple(self)

    def items(self):
        return tuple(zip(self._fields, self))

    def to_tuple(self) -> tuple:
        return tuple(self)

    def __repr__(self) -> str:
        return f"StepOutput(prev_sample={self[0]!r}, pred_original_sample={self[1]!r})"


class SchedulerConfig(dict):
    """A scheduler's settings, read-only, by key and by attribute (as diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no setting {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only; build a new scheduler with from_config(config, **changes)")

    def __reduce__(self):
        return (SchedulerConfig, (dict(self),))

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _frozen


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "patchddm",
                        steps_offset: int = 0) -> np.ndarray:
    """The descending integer timesteps of a sampler with num_inference_steps steps.

    patchddm: round(linspace(T - 1, 0, n)), rounding half to even (the original PatchDDM DDIM);
    linspace: round(linspace(0, T - 1, n)) reversed (diffusers'; differs from patchddm at
              floating-point ties, e.g. n = 1 gives 0, not T - 1);
    leading:  arange(n) * (T // n), reversed, plus steps_offset (diffusers' default);
    trailing: round(arange(T, 0, -T / n)) - 1.
    """
    T, n = num_train_timesteps, num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
    if spacing == "patchddm":
        steps = np.round(np.linspace(T - 1, 0, n))
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(n) * (T // n))[::-1] + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    steps = steps.astype(np.int64)
    if spacing == "trailing" and (len(steps) != n or steps[-1] < 0):
        # diffusers' own list for these counts (61, 103, 121, ...) has n + 1 entries ending at -1
        # (a floating-point arange); it indexes alpha_bar[-1], so it is refused, not reproduced
        raise ValueError(f"timestep_spacing='trailing' has no valid list of {n} steps for {T} training steps "
                         f"(diffusers' arange gives {len(steps)} ending at {steps[-1]}); choose another "
                         f"num_inference_steps")
    if steps[0] >= T:
        raise ValueError(f"steps_offset={steps_offset} puts the timesteps outside [0, {T}): {steps[0]}")
    return steps


def default_offset(timestep, numel: int, num_train_timesteps: int, member: int = 0) -> int:
    """The Philox offset of a step's noise when the caller gives none: block
    member * (T + 1) + t + 1 of numel elements, so that every (member, timestep) draws its own
    noise from one seed, and block 0 of member 0 (offset 0 .. numel - 1) stays free for x_T."""
    if isinstance(member, bool) or not isinstance(member, int) or member < 0:
        raise ValueError(f"member must be an int >= 0 (the ensemble member's index), got {member!r}")
    return (member * (num_train_timesteps + 1) + int(timestep) + 1) * int(numel)


def betas_from_config(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                      trained_betas) -> NoiseSchedule:
    """The schedule diffusers builds from these arguments: float32 betas (kept bit for bit, then
    used in float64), so a scheduler given by keyword differs from one given a float64
    NoiseSchedule by float32 rounding of the betas. Explicit ends are never scaled by 1000 / T
    (guided-diffusion's named schedule: NoiseSchedule.from_name)."""
    if trained_betas is not None:
        return NoiseSchedule(torch.as_tensor(np.asarray(trained_betas, dtype=np.float64)), "custom")
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    if beta_schedule == "linear":
        return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float32), "linear")
    if beta_schedule == "scaled_linear":
        roots = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32)
        return NoiseSchedule(roots ** 2, "scaled_linear")
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):  # diffusers rounds these float64 betas to float32
        return NoiseSchedule(NoiseSchedule.cosine(int(T)).betas.float(), "cosine")
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


_SCHEDULE_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
_UNSUPPORTED = {"thresholding": False, "rescale_betas_zero_snr": False}


class _Scheduler:
    """What DDPM, DDIM and DPM-Solver++ share: settings, schedule, timesteps, add_noise."""

    order = 1
    init_noise_sigma = 1.0
    _patchddm_defaults: dict = {}
    _diffusers_defaults: dict = {}

    def _setup(self, schedule, settings: dict) -> None:
        """settings: the constructor's keyword arguments, None where not given. schedule: a
        NoiseSchedule (the PatchDDM form), None, or an int: num_train_timesteps given by
        position, as diffusers' first parameter."""
        if isinstance(schedule, (int, np.integer)) and not isinstance(schedule, bool):
            if settings.get("num_train_timesteps") is not None:
                raise TypeError(f"{type(self).__name__}: num_train_timesteps given twice")
            settings = {**settings, "num_train_timesteps": int(schedule)}
            schedule = None
        patchddm_form = schedule is not None
        if patchddm_form and not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"{type(self).__name__}: the first argument must be a NoiseSchedule (the PatchDDM form) "
                            f"or num_train_timesteps (an int); got {type(schedule).__name__}. Give diffusers' "
                            f"other settings by keyword, e.g. {type(self).__name__}(1000, beta_schedule='linear')")
        defaults = {**self._diffusers_defaults, **(self._patchddm_defaults if patchddm_form else {})}
        config = {k: (defaults[k] if v is None and k in defaults else v) for k, v in settings.items()}
        # as diffusers: the settings left at their defaults, which from_config does not carry over
        # to another class (so a DPM-Solver built from a DDPM config keeps its own defaults)
        unset = sorted(k for k, v in settings.items() if v is None and k in self._diffusers_defaults)
        for name, allowed in _UNSUPPORTED.items():
            if config.pop(name, allowed) != allowed:
                raise ValueError(f"{type(self).__name__}: {name}={not allowed} is not supported")
        if patchddm_form:
            both = [k for k in _SCHEDULE_SETTINGS if settings.get(k) is not None]
            if both:
                raise ValueError(f"{type(self).__name__}: give either a NoiseSchedule or {', '.join(both)}, not both")
            config.update(num_train_timesteps=schedule.num_timesteps, beta_start=float(schedule.betas[0]),
                          beta_end=float(schedule.betas[-1]), beta_schedule=schedule.name,
                          trained_betas=schedule.betas.tolist())
            self.schedule = schedule
        else:
            self.schedule = betas_from_config(config["num_train_timesteps"], config["beta_start"],
                                              config["beta_end"], config["beta_schedule"], config["trained_betas"])
            config["num_train_timesteps"] = self.schedule.num_timesteps
        check_prediction_type(config["prediction_type"])
        if config["timestep_spacing"] not in self._spacings:
            raise ValueError(f"timestep_spacing must be one of {self._spacings}, got {config['timestep_spacing']!r}")
        offset = config.get("steps_offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {offset!r}")
        if "clip_sample_range" in config and not config["clip_sample_range"] > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {config['clip_sample_range']!r}")
        if patchddm_form:  # the schedule and the PatchDDM defaults are carried over too
            unset = [k for k in unset if k not in _SCHEDULE_SETTINGS and k not in self._patchddm_defaults]
        self.config = SchedulerConfig(config, _use_default_values=unset)
        # before set_timesteps: every training timestep, descending (diffusers' initial list)
        self._use_timesteps(np.arange(self.num_train_timesteps)[::-1], custom=False)

    _spacings = SPACINGS

    @classmethod
    def from_config(cls, config: Mapping, **changes):
        """A scheduler of this class from another's config (diffusers' idiom for switching
        schedulers); settings this class does not take are left out."""
        accepted = inspect.signature(cls.__init__).parameters
        defaulted = set(config.get("_use_default_values", ()))
        given = {k: v for k, v in dict(config).items() if k in accepted and k not in defaulted}
        return cls(**{**given, **changes})

    # diffusers' attribute names
    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def betas(self) -> torch.Tensor:
        return self.schedule.betas

    @property
    def alphas(self) -> torch.Tensor:
        return self.schedule.alphas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule.alphas_cumprod

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def timestep_spacing(self) -> str:
        return self.config.timestep_spacing

    @property
    def clip_sample(self) -> bool:
        return bool(self.config.get("clip_sample", False))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """Chooses the timesteps of sampling (1 to T of them), or takes a descending list of them.

        Returns the scheduler itself, so that the PatchDDM form's
        `DDIMScheduler(schedule, eta=0).set_timesteps(n)` chains (diffusers returns None; a
        diffusers user ignores the result either way).
        """
        T = self.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("set_timesteps: give num_inference_steps or timesteps, not both")
            steps = np.asarray(timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps,
                               dtype=np.int64).reshape(-1)
            if steps.size == 0 or (np.diff(steps) >= 0).any() or steps[0] >= T or steps[-1] < 0:
                raise ValueError(f"set_timesteps: timesteps must be a non-empty strictly descending list in "
                                 f"[0, {T}), got {steps.tolist()}")
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: give num_inference_steps (or timesteps)")
            steps = self._timestep_list(num_inference_steps)
            self.custom_timesteps = False
        return self._use_timesteps(steps, custom=self.custom_timesteps, device=device)

    def _use_timesteps(self, steps: np.ndarray, custom: bool, device=None):
        self.custom_timesteps = custom
        self.num_inference_steps = len(steps)
        self.timesteps = torch.from_numpy(np.ascontiguousarray(steps, dtype=np.int64)).to(device)
        self._listed = steps.tolist()
        self._reset()
        return self

    def _timestep_list(self, n: int) -> np.ndarray:
        return inference_timesteps(self.num_train_timesteps, n, self.config.timestep_spacing,
                                   self.config.get("steps_offset", 0))

    def _reset(self) -> None:
        """Forgets the state of a run (multistep solvers keep one)."""

    def _next_listed(self, t: int) -> int:
        """The largest listed timestep below t, -1 when there is none."""
        below = [s for s in self._listed if s < t]
        return max(below) if below else -1

    def previous_timestep(self, timestep) -> int:
        """The timestep a step at `timestep` goes to, -1 for "before t = 0" (the final alpha)."""
        return self._next_listed(_timestep(timestep, self.num_train_timesteps))

    def _final_alpha_bar(self) -> float:
        return 1.0

    def _alpha_bars(self, t: int) -> tuple[float, float, int]:
        prev = self.previous_timestep(t)
        ab_prev = self._final_alpha_bar() if prev < 0 else float(self.alphas_cumprod[prev])
        return float(self.alphas_cumprod[t]), ab_prev, prev

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (these schedulers do not scale the input); here for diffusers' interface."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None, timesteps, *,
                  seed: int | None = None, offset: int = 0) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

        timesteps: an int or N integers; as in diffusers, their coefficients take the shape
        (N, 1, ..., 1) and broadcast against original_samples and noise (a batch of 1 with N
        timesteps gives N samples). noise: a tensor, or None to draw it inside the fused kernel
        (patchddm_fast.ops.q_sample) from (seed, offset): then add_noise(x0, None, t, seed=s)
        == add_noise(x0, philox_normal(x0.shape, s), t).
        """
        ab = self.schedule.alpha_bar(timesteps).reshape(-1)
        if noise is None:
            batch = original_samples.shape[0] if original_samples.dim() else 1
            if ab.numel() not in (1, batch):
                raise ValueError(f"add_noise: {ab.numel()} timesteps for a batch of {batch} (noise=None draws "
                                 f"noise shaped like original_samples; pass a noise tensor to broadcast)")
            return q_sample(original_samples, ab, seed=seed, offset=offset, return_noise=False)
        dims = max(original_samples.dim(), noise.dim(), 1)
        view = (ab.numel(),) + (1,) * (dims - 1)
        try:
            shape = torch.broadcast_shapes(view, original_samples.shape, noise.shape)
        except RuntimeError:
            raise ValueError(f"add_noise: noise {tuple(noise.shape)}, original_samples "
                             f"{tuple(original_samples.shape)} and {ab.numel()} timesteps do not broadcast") from None
        acc = _acc(original_samples)
        sqrt_ab = ab.sqrt().to(device=original_samples.device, dtype=acc).reshape(view)
        sqrt_1m = (1 - ab).sqrt().to(device=original_samples.device, dtype=acc).reshape(view)
        x_t = sqrt_ab * original_samples.to(acc) + sqrt_1m * noise.to(device=original_samples.device, dtype=acc)
        return x_t.to(original_samples.dtype).expand(shape)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) sample (the v_prediction target)."""
        ab = self.schedule.alpha_bar(timesteps).reshape(-1)
        view = (-1,) + (1,) * (max(sample.dim(), 1) - 1)
        acc = _acc(sample)
        a = ab.sqrt().to(device=sample.device, dtype=acc).reshape(view)
        s = (1 - ab).sqrt().to(device=sample.device, dtype=acc).reshape(view)
        return (a * noise.to(acc) - s * sample.to(acc)).to(sample.dtype)

    def _noise_source(self, sample, t, generator, variance_noise, seed, offset, member):
        """(z or None, seed, offset): an explicit noise tensor (variance_noise, or drawn from
        generator as diffusers draws it), else the Philox key of the fused kernel."""
        if sum(v is not None for v in (variance_noise, generator, seed)) > 1:
            raise ValueError("step: give one of variance_noise, generator and seed, not more")
        if variance_noise is not None:
            if tuple(variance_noise.shape) != tuple(sample.shape):
                raise ValueError(f"step: variance_noise has shape {tuple(variance_noise.shape)}, expected "
                                 f"{tuple(sample.shape)} like the sample")
            return variance_noise, None, None
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"step: generator must be a torch.Generator, got {type(generator).__name__}")
            z = torch.randn(tuple(sample.shape), generator=generator, device=generator.device, dtype=sample.dtype)
            return z.to(sample.device), None, None
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if offset is None:
            offset = default_offset(t, sample.numel(), self.num_train_timesteps, member)
        return None, seed, offset

    @staticmethod
    def _finish(prev, x0, out, x0_out, return_dict):
        if out is not None and prev is not out:
            out.copy_(prev)
            prev = out
        if x0_out is not None and x0 is not x0_out:
            x0_out.copy_(x0)
            x0 = x0_out
        return StepOutput(prev, x0) if return_dict else (prev, x0)


class DDPMScheduler(_Scheduler):
    """Ancestral sampling (Ho et al. 2020): x_{t_prev} ~ q(x_{t_prev} | x_t, x0_pred), as
    diffusers' DDPMScheduler.

    Each step goes to the next listed timestep (-1, alpha_bar = 1, after the last one) and uses
    the effective beta 1 - alpha_bar_t / alpha_bar_prev of its jump. variance_type:
    "fixed_small" (the posterior variance) or "fixed_large" (that beta). Noise is added at every
    t > 0, as diffusers does (at the last step that is only fixed_large's, from a trailing or
    linspace list; fixed_small's is 0 there).
    """

    _diffusers_defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                               trained_betas=None, variance_type="fixed_small", clip_sample=True,
                               prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                               steps_offset=0)
    _patchddm_defaults = dict(timestep_spacing="patchddm")

    def __init__(self, schedule: NoiseSchedule | None = None, *, num_train_timesteps: int | None = None,
                 beta_start: float | None = None, beta_end: float | None = None, beta_schedule: str | None = None,
                 trained_betas=None, variance_type: str | None = None, clip_sample: bool | None = None,
                 prediction_type: str | None = None, thresholding: bool = False,
                 clip_sample_range: float | None = None, timestep_spacing: str | None = None,
                 steps_offset: int | None = None, rescale_betas_zero_snr: bool = False):
        settings = dict(locals())
        for name in ("self", "schedule", "__class__"):
            settings.pop(name, None)
        variance = variance_type or self._diffusers_defaults["variance_type"]
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
        self._setup(schedule, settings)

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    @property
    def draws_noise(self) -> bool:
        return True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None, seed: int | None = None,
             offset: int | None = None, member: int = 0, out: torch.Tensor | None = None,
             x0_out: torch.Tensor | None = None) -> StepOutput:
        """One step from `sample` (x_t) at `timestep` given the network's `model_output` (the
        noise, x0 or v, as prediction_type says).

        Noise: variance_noise, else drawn from generator as diffusers does, else Philox noise
        keyed by (seed, offset) in the fused kernel (seed None: one drawn from torch's
        generator; offset None: default_offset(timestep, sample.numel(), T, member)).
        out / x0_out: tensors (any strides) to write into. return_dict=False: a plain tuple.
        """
        model_output = _like(model_output, sample)
        t = _timestep(timestep, self.num_train_timesteps)
        ab_t, ab_prev, prev = self._alpha_bars(t)
        z, seed, offset = self._noise_source(sample, t, generator, variance_noise, seed, offset, member)
        r = float(self.config.clip_sample_range)
        late_noise = t > 0 and prev < 0 and self.variance_type == "fixed_large"  # the kernel adds none there
        if z is None and (not self.clip_sample or r == 1.0) and not late_noise:
            eps = predicted_noise(model_output, sample, ab_t, self.prediction_type, self.clip_sample)
            prev_sample, x0 = ddpm_step(sample, eps, ab_t, ab_prev, clip=self.clip_sample, variance=self.variance_type,
                                        seed=seed, offset=offset, out=out, x0_out=x0_out)
            return self._finish(prev_sample, x0, out, x0_out, return_dict)
        if z is None:
            z = philox_normal(sample.shape, seed, offset, dtype=sample.dtype, device=sample.device)
        x0, _ = predicted_x0_and_noise(model_output, sample, ab_t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-r, r)
        beta = 1 - ab_t / ab_prev
        mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) \
            * sample.to(x0.dtype)
        if t > 0:
            var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20) if self.variance_type == "fixed_small" else beta
            mean = mean + math.sqrt(var) * z.to(device=mean.device, dtype=mean.dtype)
        return self._finish(mean.to(sample.dtype), x0.to(sample.dtype), out, x0_out, return_dict)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) with stochasticity eta (0: deterministic, 1: DDPM-like), as
    diffusers' DDIMScheduler.

    Each step goes from t to t - T // S (diffusers' rule, whatever the spacing), or with
    timestep_spacing="patchddm" to the next listed timestep; below 0 it goes to
    final_alpha_cumprod: 1 when set_alpha_to_one (diffusers' default), alpha_bar[0] when not
    (the original PatchDDM sampler). clip_sample clamps the predicted x0 to
    [-clip_sample_range, clip_sample_range]; use_clipped_model_output re-derives the noise from
    the clipped x0 (the original PatchDDM, GLIDE) rather than keeping the model's. eta set here
    is the default of step's eta.
    """

    _diffusers_defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                               trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                               prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                               eta=0.0, use_clipped_model_output=False)
    _patchddm_defaults = dict(timestep_spacing="patchddm", set_alpha_to_one=False, use_clipped_model_output=True)

    def __init__(self, schedule: NoiseSchedule | None = None, *, num_train_timesteps: int | None = None,
                 beta_start: float | None = None, beta_end: float | None = None, beta_schedule: str | None = None,
                 trained_betas=None, clip_sample: bool | None = None, set_alpha_to_one: bool | None = None,
                 steps_offset: int | None = None, prediction_type: str | None = None, thresholding: bool = False,
                 clip_sample_range: float | None = None, timestep_spacing: str | None = None,
                 rescale_betas_zero_snr: bool = False, eta: float | None = None,
                 use_clipped_model_output: bool | None = None):
        settings = dict(locals())
        for name in ("self", "schedule", "__class__"):
            settings.pop(name, None)
        if eta is not None and not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self._setup(schedule, settings)

    @property
    def eta(self) -> float:
        return float(self.config.eta)

    @property
    def set_alpha_to_one(self) -> bool:
        return bool(self.config.set_alpha_to_one)

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(self._final_alpha_bar(), dtype=torch.float64)

    def _final_alpha_bar(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def previous_timestep(self, timestep) -> int:
        t = _timestep(timestep, self.num_train_timesteps)
        if self.timestep_spacing == "patchddm" or self.custom_timesteps:
            return self._next_listed(t)
        return t - self.num_train_timesteps // self.num_inference_steps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float | None = None,
             use_clipped_model_output: bool | None = None, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, *, seed: int | None = None,
             offset: int | None = None, member: int = 0, out: torch.Tensor | None = None,
             x0_out: torch.Tensor | None = None) -> StepOutput:
        """One DDIM step from `sample` (x_t) at `timestep` given the network's output (the
        noise, x0 or v, as prediction_type says). Arguments as diffusers' (eta and
        use_clipped_model_output None: the scheduler's); noise (eta > 0 only) and the
        keyword-only arguments as DDPMScheduler.step.
        """
        eta = self.eta if eta is None else float(eta)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        rederive = use_clipped_model_output
        if rederive is None:
            rederive = self.config.use_clipped_model_output
        model_output = _like(model_output, sample)
        t = _timestep(timestep, self.num_train_timesteps)
        ab_t, ab_prev, _ = self._alpha_bars(t)
        z = None
        if eta > 0:
            z, seed, offset = self._noise_source(sample, t, generator, variance_noise, seed, offset, member)
        clip, r = self.clip_sample, float(self.config.clip_sample_range)
        fused = z is None and (not clip or (r == 1.0 and (rederive or self.prediction_type == "epsilon")))
        if fused:
            # The kernel clips and re-derives the noise in one pass; diffusers' default (clip,
            # keep the model's noise) is the unclipped update moved by sqrt(ab_prev) (x0c - x0).
            kernel_clip = clip and bool(rederive)
            eps = predicted_noise(model_output, sample, ab_t, self.prediction_type, kernel_clip)
            prev_sample, x0 = ddim_step(sample, eps, ab_t, ab_prev, eta=eta, clip=kernel_clip,
                                        seed=seed if eta > 0 else None, offset=offset or 0, out=out, x0_out=x0_out)
            if clip and not kernel_clip:
                moved = x0.clamp(-1.0, 1.0) - x0
                prev_sample.add_(moved, alpha=math.sqrt(ab_prev))
                x0.add_(moved)
            return self._finish(prev_sample, x0, out, x0_out, return_dict)
        if eta > 0 and z is None:
            z = philox_normal(sample.shape, seed, offset, dtype=sample.dtype, device=sample.device)
        x0, eps = predicted_x0_and_noise(model_output, sample, ab_t, self.prediction_type)
        if clip:
            x0 = x0.clamp(-r, r)
            if rederive:
                eps = (sample.to(x0.dtype) - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * max(1 - ab_t / ab_prev, 0.0))
        prev_sample = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if eta > 0:
            prev_sample = prev_sample + sigma * z.to(device=prev_sample.device, dtype=prev_sample.dtype)
        return self._finish(prev_sample.to(sample.dtype), x0.to(sample.dtype), out, x0_out, return_dict)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _timestep(timestep, num_train_timesteps: int) -> int:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"step: timestep must be one integer, got a tensor of shape {tuple(timestep.shape)}")
        timestep = timestep.item()
    if isinstance(timestep, bool) or not float(timestep).is_integer():
        raise ValueError(f"step: timestep must be an integer, got {timestep!r}")
    t = int(timestep)
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"step: timestep must lie in [0, {num_train_timesteps}), got {t}")
    return t


def _like(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The model's prediction in the sample's dtype (autocast returns bf16/fp16 outputs)."""
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but the sample has shape "
                         f"{tuple(sample.shape)}; the model must predict the noise of every sample voxel")
    return model_output if model_output.dtype == sample.dtype else model_output.to(sample.dtype)
