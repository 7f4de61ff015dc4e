"""The reverse-process loop (denoise), and on it DDIM (the original PatchDDM sampler, and
eta > 0) and ancestral DDPM; FullVolumeSampler runs the same loop on whole volumes.

The model input is one buffer (B, C + 1, D, H, W) holding [condition, x_t]; the condition is
copied in once, and every step's noise update writes x_t straight into the last channel
(scheduler.step(..., out=buffer[:, C:])): no torch.cat per step.

Noise of stochastic steps: step i (0-based) draws Philox noise keyed by (seed, (i + 1) * n),
n = the number of elements of x_t, so no two steps share noise and offset 0 .. n-1 is left
for x_T itself (see FullVolumeSampler).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..precision import autocast
from .schedule import NoiseSchedule
from .schedulers import DDIMScheduler, DDPMScheduler


def predict_noise(model, model_input: torch.Tensor, timestep: int, xt_shape, precision: str = "float32"):
    """model(model_input, t) with integer timesteps (B,), checked to be the noise of x_t."""
    timesteps = torch.full((model_input.shape[0],), int(timestep), dtype=torch.int64, device=model_input.device)
    with autocast(model_input.device, precision):
        eps = model(model_input, timesteps)
    if not isinstance(eps, torch.Tensor) or tuple(eps.shape) != tuple(xt_shape):
        raise ValueError(f"the model returned {tuple(getattr(eps, 'shape', ())) or type(eps).__name__} for an input "
                         f"of shape {tuple(model_input.shape)}; expected the predicted noise of x_t, shape "
                         f"{tuple(xt_shape)} (one output channel per x_t channel, same spatial size)")
    return eps


def denoise(scheduler, x: torch.Tensor, x0: torch.Tensor, predict, seeds, on_step=None) -> torch.Tensor:
    """The reverse process, in place: x holds x_T on entry and the sample on return.

    For each of the scheduler's timesteps t (step i): eps = predict(t), then the scheduler's
    update writes x_{t-1} into x (and its x0 estimate into x0). seeds: the Philox key of the
    noise of stochastic steps, one int for the whole of x (offset (i + 1) * x.numel()) or one
    per batch element, each member's noise from its own key (offset (i + 1) * x[0].numel()),
    so that how members are batched does not change them. on_step(): after each step.
    """
    for i, t in enumerate(scheduler.timesteps.tolist()):
        eps = predict(t)
        if not scheduler.draws_noise:
            scheduler.step(eps, t, x, out=x, x0_out=x0)
        elif isinstance(seeds, int):
            scheduler.step(eps, t, x, seed=seeds, offset=(i + 1) * x.numel(), out=x, x0_out=x0)
        else:
            offset = (i + 1) * x[0].numel()
            for j, seed in enumerate(seeds):
                scheduler.step(eps[j:j + 1], t, x[j:j + 1], seed=seed, offset=offset, out=x[j:j + 1],
                               x0_out=x0[j:j + 1])
        if on_step is not None:
            on_step()
    return x


def _check_condition_noise(name: str, condition: torch.Tensor, noise: torch.Tensor) -> None:
    for label, t in (("condition", condition), ("noise", noise)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or not t.is_floating_point():
            raise ValueError(f"{name}: {label} must be a floating-point (B, C, D, H, W) tensor, got "
                             f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)}")
    if noise.shape[0] != condition.shape[0] or noise.shape[2:] != condition.shape[2:]:
        raise ValueError(f"{name}: noise has shape {tuple(noise.shape)}, expected (B, C_x, *spatial) matching "
                         f"condition {tuple(condition.shape)} in batch and spatial size")
    if noise.device != condition.device:
        raise ValueError(f"{name}: noise is on {noise.device} but condition is on {condition.device}")


@torch.no_grad()
def sample_loop(model, scheduler, condition: torch.Tensor, noise: torch.Tensor, *, seed: int | None = None,
                precision: str = "float32", progress: bool = False) -> torch.Tensor:
    """Runs `scheduler` from x_T = noise, conditioned on `condition`; returns the final x.

    model(x, timesteps) receives x = [condition, x_t] (B, C + C_x, ...) and integer timesteps
    (B,); it must return the noise prediction (B, C_x, ...). scheduler: a DDIMScheduler or
    DDPMScheduler after set_timesteps. seed: Philox key of stochastic steps (None: random).
    precision: 'float32', or 'bfloat16' / 'float16' autocast for the model (x_t stays in the
    condition's dtype). The result has noise's shape and the condition's dtype.
    """
    _check_condition_noise("sample_loop", condition, noise)
    channels = condition.shape[1]
    buffer = torch.empty((condition.shape[0], channels + noise.shape[1]) + tuple(condition.shape[2:]),
                         dtype=condition.dtype, device=condition.device)
    buffer[:, :channels].copy_(condition)
    x_t = buffer[:, channels:]
    x_t.copy_(noise)
    x0 = torch.empty_like(x_t)
    if seed is None and scheduler.draws_noise:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    seed = int(seed) if seed is not None else None
    with tqdm(total=len(scheduler.timesteps), desc="sampling", disable=not progress) as bar:
        denoise(scheduler, x_t, x0, lambda t: predict_noise(model, buffer, t, x_t.shape, precision), seed,
                on_step=bar.update)
    return x_t.clone()


def original_ddim_sample(model, condition: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The DDIM sampler of the original PatchDDM, reproduced exactly.

    Linear schedule (1e-4 .. 0.02, 1000 steps, float64); timesteps round(linspace(999, 0,
    steps)); each step goes to the next timestep of that list and the last (t = 0) to
    alpha_bar[0]; eta = 0; x0 clipped to [-1, 1] and the noise re-derived from it; the model
    receives integer timesteps.
    condition: (B, 7, D, H, W) the 4 MR channels and 3 coordinate channels;
    noise: (B, 1, D, H, W) x_T. Returns the sample (B, 1, D, H, W); tumour where > 0.5.
    """
    scheduler = DDIMScheduler(NoiseSchedule.linear(), eta=0.0, clip_sample=True, set_alpha_to_one=False,
                              timestep_spacing="patchddm").set_timesteps(steps)
    return sample_loop(model, scheduler, condition, noise)


def ddim_sample(model, condition: torch.Tensor, noise: torch.Tensor, steps: int, *, eta: float = 0.0,
                seed: int | None = None, schedule: NoiseSchedule | None = None, clip_sample: bool = True,
                set_alpha_to_one: bool = False, precision: str = "float32", progress: bool = False) -> torch.Tensor:
    """DDIM with `steps` steps and stochasticity eta (eta = 0: original_ddim_sample)."""
    scheduler = DDIMScheduler(schedule or NoiseSchedule.linear(), eta=eta, clip_sample=clip_sample,
                              set_alpha_to_one=set_alpha_to_one).set_timesteps(steps)
    return sample_loop(model, scheduler, condition, noise, seed=seed, precision=precision, progress=progress)


def ddpm_sample(model, condition: torch.Tensor, noise: torch.Tensor, steps: int = 1000, *,
                seed: int | None = None, schedule: NoiseSchedule | None = None, clip_sample: bool = True,
                variance_type: str = "fixed_small", precision: str = "float32",
                progress: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling (all 1000 steps by default, fewer with respaced jumps)."""
    scheduler = DDPMScheduler(schedule or NoiseSchedule.linear(), clip_sample=clip_sample,
                              variance_type=variance_type).set_timesteps(steps)
    return sample_loop(model, scheduler, condition, noise, seed=seed, precision=precision, progress=progress)
