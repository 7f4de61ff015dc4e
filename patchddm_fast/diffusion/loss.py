"""The training objective of PatchDDM: from a noised tumour mask, predict the mask, the noise or v.

Per sample b: t_b ~ U{0, ..., T-1}, x_t = sqrt(ab_t) * mask + sqrt(1 - ab_t) * z, and
loss = mean((model([image, coordinates, x_t], t) - target)^2), where target is, by
prediction_type (diffusers' names): "epsilon" z (the original PatchDDM), "sample" the mask
itself (x0), "v_prediction" sqrt(ab_t) z - sqrt(1 - ab_t) mask. docs/STUDY.md measures why
"sample" learns the segmentation several times faster per step than "epsilon".

The model input is one buffer (B, C + 1, D, H, W): the data pipeline writes the image and the
coordinates into its first C channels (patchddm_fast.ops.assemble_input), and the fused
q_sample writes x_t straight into its last channel, so no torch.cat happens per step. The
noise z is not kept alive through the forward pass: it is regenerated from its Philox key
(seed, offset) for the loss.

The noise has one Philox key for the batch, or one per sample (the trainer keys each sample
by its number in the run, so that resumed and data-parallel runs draw the same noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops import philox_normal, q_sample
from ..precision import autocast
from .schedule import NoiseSchedule
from .schedulers import check_prediction_type


class LossOutput(NamedTuple):
    loss: torch.Tensor          # the mean loss (0-d), or per sample (B,) with reduction="none"
    timesteps: torch.Tensor     # (B,) int64 on the model input's device
    seed: int | list[int]       # Philox key(s) of the noise (see diffusion_loss)
    prediction: torch.Tensor    # the model's prediction (B, 1, D, H, W): noise, x0 or v


def model_input_buffer(condition: torch.Tensor, xt_channels: int = 1) -> torch.Tensor:
    """A (B, C + xt_channels, ...) buffer holding `condition` in its first C channels.

    For callers that have the condition as a separate tensor; the data pipeline of the
    trainer fills such a buffer directly (assemble_input(..., out=buffer)).
    """
    if not isinstance(condition, torch.Tensor) or condition.dim() < 2:
        raise ValueError(f"condition must be a (B, C, ...) tensor, got {getattr(condition, 'shape', condition)}")
    shape = (condition.shape[0], condition.shape[1] + xt_channels) + tuple(condition.shape[2:])
    buffer = torch.empty(shape, dtype=condition.dtype, device=condition.device)
    buffer[:, :condition.shape[1]].copy_(condition)
    return buffer


def sample_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{0, ..., T-1} per sample, as int64 CPU values (drawn from `generator`)."""
    return torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)


def diffusion_loss(model, model_input: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule, *,
                   timesteps: torch.Tensor | None = None, seed: int | Sequence[int] | None = None,
                   generator: torch.Generator | None = None, precision: str | torch.dtype = "float32",
                   reduction: str = "mean", return_details: bool = False, prediction_type: str = "epsilon"):
    """The diffusion loss of one batch.

    model: callable model(x, timesteps) -> its prediction (of prediction_type) shaped like mask.
    model_input: (B, C_in, D, H, W) buffer; channels [:C_in - K] hold image and coordinates,
        the last K = mask.shape[1] channels are overwritten with x_t (in place).
    mask: (B, K, D, H, W) the clean target x0 (PatchDDM: the binary tumour mask, 0 or 1).
    schedule: the noise schedule (NoiseSchedule.linear() for PatchDDM).
    timesteps: optional (B,) integer timesteps; default drawn uniformly from `generator`.
    seed: Philox key of the noise, z = philox_normal(mask.shape, seed); or one key per sample,
        z[b] = philox_normal(mask[b:b+1].shape, seed[b]); default one key drawn from
        `generator` (None: torch's default).
    precision: autocast of the model's forward (patchddm_fast.precision); the loss is float32.
    reduction: "mean" (a 0-d tensor) or "none" (the loss of each sample, (B,)).
    prediction_type: "epsilon", "sample" or "v_prediction" (see the module's docstring).
    Returns the loss, or LossOutput(loss, timesteps, seed, prediction) with return_details.
    """
    name = "diffusion_loss"
    if reduction not in ("mean", "none"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")
    check_prediction_type(prediction_type)
    for label, t in (("model_input", model_input), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.dim() < 3:
            raise ValueError(f"{name}: {label} must be a (B, C, ...) tensor, got {getattr(t, 'shape', type(t))}")
    batch, k = mask.shape[0], mask.shape[1]
    if model_input.shape[0] != batch or model_input.shape[2:] != mask.shape[2:] or model_input.shape[1] <= k:
        raise ValueError(f"{name}: model_input has shape {tuple(model_input.shape)}; expected (B, C + {k}, "
                         f"*spatial) with B and spatial size of mask {tuple(mask.shape)} and its last {k} "
                         "channel(s) free for x_t")
    if mask.device != model_input.device:
        raise ValueError(f"{name}: mask is on {mask.device} but model_input is on {model_input.device}")
    if timesteps is None:
        timesteps = sample_timesteps(batch, schedule, generator)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1)
    if timesteps.numel() != batch:
        raise ValueError(f"{name}: {timesteps.numel()} timesteps for a batch of {batch}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if isinstance(seed, Sequence):
        seed = [int(s) for s in seed]
        if len(seed) != batch:
            raise ValueError(f"{name}: {len(seed)} noise seeds for a batch of {batch}")
    else:
        seed = int(seed)

    x_t = model_input[:, -k:]
    target, alpha_bar = mask.to(model_input.dtype), schedule.alpha_bar(timesteps)
    if isinstance(seed, int):
        q_sample(target, alpha_bar, seed=seed, return_noise=False, out=x_t)
    else:
        for b, key in enumerate(seed):
            q_sample(target[b:b + 1], alpha_bar[b:b + 1], seed=key, return_noise=False, out=x_t[b:b + 1])
    timesteps = timesteps.to(model_input.device)
    with autocast(model_input.device, precision):
        prediction = model(model_input, timesteps)
    if not isinstance(prediction, torch.Tensor) or prediction.shape != mask.shape:
        raise ValueError(f"{name}: the model returned shape {tuple(getattr(prediction, 'shape', ()))}; "
                         f"expected a prediction shaped like mask {tuple(mask.shape)}")
    wanted = _target(prediction_type, mask, seed, alpha_bar)
    if reduction == "mean":
        loss = F.mse_loss(prediction.float(), wanted)
    else:
        loss = F.mse_loss(prediction.float(), wanted, reduction="none").flatten(1).mean(dim=1)
    if return_details:
        return LossOutput(loss, timesteps, seed, prediction)
    return loss


def _target(prediction_type: str, mask: torch.Tensor, seed: int | list[int], alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network should have predicted, in float32."""
    if prediction_type == "sample":
        return mask.float()
    noise = _noise(mask, seed)
    if prediction_type == "epsilon":
        return noise
    view = (-1,) + (1,) * (mask.dim() - 1)
    a = alpha_bar.sqrt().to(device=mask.device, dtype=torch.float32).view(view)
    s = (1 - alpha_bar).sqrt().to(device=mask.device, dtype=torch.float32).view(view)
    return a * noise - s * mask.float()


def _noise(mask: torch.Tensor, seed: int | list[int]) -> torch.Tensor:
    """The noise q_sample drew, regenerated from its key(s) in float32."""
    if isinstance(seed, int):
        return philox_normal(mask.shape, seed, dtype=torch.float32, device=mask.device)
    noise = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    for b, key in enumerate(seed):
        noise[b:b + 1] = philox_normal((1,) + tuple(mask.shape[1:]), key, device=mask.device)
    return noise
