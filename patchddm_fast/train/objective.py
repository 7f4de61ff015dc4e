"""The training loss of a batch, with every random draw keyed by the sample's number.

Sample n of a run (its patch is PatchDataset item n) gets its timestep and its noise's Philox
seed from a generator keyed by (seed, n) alone. So a resumed run draws exactly what the
uninterrupted run would have drawn, and data-parallel processes, which read interleaved sample
numbers, together compute the same losses as one process on the combined batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import NoiseSchedule
from ..ops import philox_normal, q_sample

_DIFFUSION_STREAM = 2  # the data module keys its draws with streams 0 and 1


def sample_numbers(samples_done: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample numbers of this process's next batch (patchddm_fast.data.StreamSampler's
    order: start + rank, start + rank + world_size, ...)."""
    return [samples_done + j * world_size + rank for j in range(batch_size)]


def sample_draws(seed: int, numbers, num_timesteps: int) -> tuple[torch.Tensor, list[int]]:
    """(timesteps (B,) int64, noise seeds) of the given sample numbers."""
    timesteps, seeds = [], []
    for number in numbers:
        rng = np.random.default_rng([seed, _DIFFUSION_STREAM, int(number)])
        timesteps.append(int(rng.integers(0, num_timesteps)))
        seeds.append(int(rng.integers(0, 2**62)))
    return torch.tensor(timesteps, dtype=torch.int64), seeds


def noise_prediction_loss(model, model_input: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule,
                          timesteps: torch.Tensor, seeds: list[int], autocast=None,
                          prediction_type: str = "epsilon") -> torch.Tensor:
    """mean((model([image, coordinates, x_t], t) - target)^2) over the batch.

    model_input: (B, C + 1, ...) with image and coordinates in the first C channels; its last
    channel is overwritten with x_t = sqrt(ab_t) mask + sqrt(1 - ab_t) z (fused q_sample, in
    place). z of sample b is Philox noise of seeds[b]; it is regenerated for the loss rather
    than kept alive through the forward pass. autocast: a context manager for the forward.
    target, by prediction_type: "epsilon" z (the original PatchDDM), "sample" the mask (x0),
    "v_prediction" sqrt(ab_t) z - sqrt(1 - ab_t) mask.
    """
    batch = mask.shape[0]
    if model_input.shape[0] != batch or len(seeds) != batch or timesteps.numel() != batch:
        raise ValueError(f"noise_prediction_loss: batch sizes differ: input {tuple(model_input.shape)}, "
                         f"mask {tuple(mask.shape)}, {timesteps.numel()} timesteps, {len(seeds)} seeds")
    alpha_bar = schedule.alpha_bar(timesteps)
    x_t = model_input[:, -mask.shape[1]:]
    target = mask.to(model_input.dtype)
    for b in range(batch):
        q_sample(target[b:b + 1], alpha_bar[b:b + 1], seed=seeds[b], return_noise=False, out=x_t[b:b + 1])
    steps = timesteps.to(model_input.device)
    if autocast is None:
        prediction = model(model_input, steps)
    else:
        with autocast:
            prediction = model(model_input, steps)
    if prediction.shape != mask.shape:
        raise ValueError(f"the model returned shape {tuple(prediction.shape)}, expected the noise of the mask "
                         f"{tuple(mask.shape)}")
    if prediction_type == "sample":
        return F.mse_loss(prediction.float(), mask.float())
    noise = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    for b in range(batch):
        noise[b:b + 1] = philox_normal((1,) + tuple(mask.shape[1:]), seeds[b], device=mask.device)
    if prediction_type == "epsilon":
        return F.mse_loss(prediction.float(), noise)
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
    view = (-1,) + (1,) * (mask.dim() - 1)
    a = alpha_bar.sqrt().to(device=mask.device, dtype=torch.float32).view(view)
    s = (1 - alpha_bar).sqrt().to(device=mask.device, dtype=torch.float32).view(view)
    return F.mse_loss(prediction.float(), a * noise - s * mask.float())
