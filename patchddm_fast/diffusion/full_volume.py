"""Segmenting a whole volume with an ensemble of diffusion samples, as PatchDDM does.

The network, trained on patches that carry their position as three coordinate channels,
runs on the whole volume at once (the paper: 4 x 256^3 MR input), once per sampling step.

- One model-input buffer (N, C + 4, D, H, W) is allocated and filled once with the image and
  the full-volume coordinates (assemble_input); each step only its x_t channel changes, written
  in place by the fused noise update.
- Ensemble members are batched as far as memory allows, else run in chunks; member m draws
  its noise only from its own seed (x_T from Philox offset 0, step i from offset (i + 1) * n),
  and the statistics accumulate member by member in a fixed order, so chunking does not
  change the result.
- Volumes whose size the network does not accept are padded (zeros, centred) to one it does
  and the results cropped back to the input's voxel grid.
- A volume too large for one pass is refused with the memory it needs; tiled=True runs
  overlapping windows instead (each with the coordinates of its position in the volume),
  whose noise predictions are blended with smooth weights at every step.

The sampler runs the plan; checking and padding the volume are volume_input's, the plan
(padding, windows, memory, chunks) plan's, and the step loop sampling.denoise.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ops import assemble_input, philox_normal
from ..precision import precision_name
from .memory import forward_peak_bytes, probe_shape
from .plan import PlanOptions, SamplingPlan, SamplingPlanner, positive_int, triple
from .sampling import denoise, predict_noise
from .schedule import NoiseSchedule
from .schedulers import DDIMScheduler
from .tiling import Tiling
from .volume_input import COORD_CHANNELS, XT_CHANNELS, check_volume, pad_volume

__all__ = ["FullVolumeSampler", "PlanOptions", "SegmentationResult", "member_seeds"]


def member_seeds(seed: int, count: int) -> list[int]:
    """The seed of each ensemble member, a function of (seed, member index) only."""
    seeds = []
    for m in range(count):
        low, high = np.random.SeedSequence(seed, spawn_key=(m,)).generate_state(2, np.uint32)
        seeds.append((int(high) << 32 | int(low)) & (2**63 - 1))
    return seeds


@dataclass
class SegmentationResult:
    """mean: (D, H, W) ensemble mean of the samples; mask: mean > 0.5; std: per-voxel standard
    deviation across the ensemble (population, 0 for one member); seeds: each member's seed
    (sampling with seeds=[s] reproduces that member); samples: (N, D, H, W) when kept."""
    mean: torch.Tensor
    mask: torch.Tensor
    std: torch.Tensor
    seeds: list
    plan: SamplingPlan
    samples: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class _Buffers:
    """A run's tensors, allocated once for the largest chunk (a chunk uses their first n rows)."""
    volume: torch.Tensor            # the padded image (1, C, *padded)
    coord_shape: tuple              # the shape the coordinates are normalised by
    model_input: torch.Tensor       # (n, C + 4, *window): image, coordinates, x_t (whole) or a tile
    x0: torch.Tensor                # (n, 1, *padded): the schedulers' x0 estimates
    x: torch.Tensor | None = None   # tiled: x_t of the whole volume (else the model input's last channel)
    eps: torch.Tensor | None = None  # tiled: the blended noise prediction
    tiling: Tiling | None = None


class _EnsembleStatistics:
    """Mean and M2 (Welford) of the members, added one at a time in a fixed order, so the
    result does not depend on how the members were chunked."""

    def __init__(self, shape: tuple, device: torch.device, keep_on: torch.device | None):
        self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0
        self.keep_on, self.samples = keep_on, []

    def add(self, member: torch.Tensor) -> None:
        self.count += 1
        delta = member - self.mean
        self.mean.add_(delta / self.count)
        self.m2.add_(delta * (member - self.mean))
        if self.keep_on is not None:
            self.samples.append(member.to(self.keep_on, copy=True))

    def std(self) -> torch.Tensor:
        return (self.m2 / self.count).sqrt()


class FullVolumeSampler:
    """Samples segmentations of whole volumes with an ensemble, on the fused ops.

    model: model(x, timesteps) -> its prediction (noise, x0 or v, as the scheduler's
        prediction_type says), x = [image (C), coordinates (3), x_t (1)].
    scheduler: a DDIMScheduler, DDPMScheduler or DPMSolverMultistepScheduler with its timesteps set (default: PatchDDM's
        DDIM, 20 steps, eta = 0: the original sampler).
    ensemble_size: samples per volume (the paper: 1 to 15); mean, mask, std come from them.
    precision: 'float32' (default), 'bfloat16' or 'float16' (any name patchddm_fast.precision
        accepts) autocast for the network.
    coord_shape: the shape the coordinates are normalised by (default the padded shape; the
        training volume's, e.g. (256, 256, 256), to give the coordinates the network learnt).
    options: PlanOptions: padding, tiling and the memory the ensemble may use.
    progress: a tqdm bar over steps and members.
    """

    def __init__(self, model, *, scheduler=None, ensemble_size: int = 1, precision: str = "float32",
                 coord_shape=None, options: PlanOptions | None = None, progress: bool = True):
        self.model = model
        self.scheduler = scheduler or DDIMScheduler(NoiseSchedule.linear(), eta=0.0).set_timesteps(20)
        self.ensemble_size = positive_int("ensemble_size", ensemble_size)
        self.precision = precision_name(precision)
        self.planner = SamplingPlanner(options or PlanOptions(), image_channels=_model_image_channels(model),
                                       size_multiple=_model_size_multiple(model))
        self.coord_shape = triple("coord_shape", coord_shape) if coord_shape is not None else None
        self.progress = progress
        self._forward_bytes_per_voxel: dict = {}

    @property
    def image_channels(self) -> int:
        return self.planner.image_channels

    @property
    def size_multiple(self) -> int:
        return self.planner.size_multiple

    @property
    def tiled(self) -> bool:
        return self.planner.tiled

    @property
    def device(self) -> torch.device:
        parameter = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return parameter.device if parameter is not None else torch.device("cpu")

    # -- planning --------------------------------------------------------------------------------

    def plan(self, volume: torch.Tensor, ensemble_size: int | None = None) -> SamplingPlan:
        """The padding, windows and chunking `sample` would use for this volume.

        Runs the network once on a small probe volume to measure its memory per voxel (and to
        check its output shape before any long computation)."""
        volume = check_volume(volume, self.image_channels, self.device)
        return self._plan(volume, ensemble_size or self.ensemble_size)

    def _plan(self, volume: torch.Tensor, ensemble_size: int) -> SamplingPlan:
        shape = tuple(volume.shape[2:])
        padded = pad_volume(volume, self.planner.padded_shape(shape))
        return self.planner.plan(shape, ensemble_size, self.device,
                                 lambda window: self._forward_bytes(padded, window), self.precision)

    def _forward_bytes(self, padded_volume: torch.Tensor, window: tuple) -> float:
        """Peak bytes per voxel of one member's forward pass, measured on a probe volume."""
        probe = probe_shape(window, self.size_multiple)
        key = (probe, self.precision)
        if key not in self._forward_bytes_per_voxel:
            x = torch.zeros((1, self.planner.channels) + probe, dtype=torch.float32, device=padded_volume.device)
            assemble_input(padded_volume, [0, 0, 0], patch_shape=probe, coord_shape=self._coord_shape(padded_volume),
                           out=x)
            t = int(self.scheduler.timesteps[0])
            external = [x, *_module_tensors(self.model)]
            with torch.no_grad(), _slabs_as_for(self.model, math.prod(probe) / math.prod(window)):
                peak = forward_peak_bytes(
                    lambda: predict_noise(self.model, x, t, (1, XT_CHANNELS) + probe, self.precision), external)
            self._forward_bytes_per_voxel[key] = peak / math.prod(probe)
        return self._forward_bytes_per_voxel[key]

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, volume: torch.Tensor, *, seed: int | None = None, seeds=None, keep_samples: bool = False,
               ensemble_size: int | None = None) -> SegmentationResult:
        """Segments one volume (C, D, H, W) or (1, C, D, H, W).

        seed: the ensemble's seed (None: drawn from torch's generator); member m uses
        member_seeds(seed, N)[m]. seeds: explicit per-member seeds instead (their number is the
        ensemble size). keep_samples: also return every member's sample.
        Results are float32 (mask: bool) on the volume's device, on the input's voxel grid.
        """
        if seeds is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            seeds = member_seeds(seed, positive_int("ensemble_size", ensemble_size or self.ensemble_size))
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("FullVolumeSampler.sample: seeds is empty")
        if getattr(self.model, "training", False):
            warnings.warn("FullVolumeSampler: the model is in training mode (dropout active, samples not "
                          "reproducible); call model.eval() first", stacklevel=2)
        result_device = volume.device
        volume = check_volume(volume, self.image_channels, self.device)
        plan = self._plan(volume, len(seeds))
        buffers = self._allocate(pad_volume(volume, plan.padded_shape), plan)
        stats = _EnsembleStatistics(plan.shape, buffers.volume.device, result_device if keep_samples else None)
        steps = len(self.scheduler.timesteps)
        with tqdm(total=len(seeds) * steps, desc="sampling", unit="step", disable=not self.progress) as bar:
            for start in range(0, len(seeds), plan.chunk_size):
                chunk = seeds[start:start + plan.chunk_size]
                bar.set_postfix_str(f"members {start + 1}-{start + len(chunk)} of {len(seeds)}")
                x = self._run_chunk(buffers, chunk, plan, lambda: bar.update(len(chunk)))
                for j in range(len(chunk)):  # member by member: the same arithmetic for any chunking
                    stats.add(x[j, 0][plan.crop])
        if not bool(torch.isfinite(stats.mean).all()):
            raise FloatingPointError("FullVolumeSampler: the samples contain NaN or inf: the model produced non-finite "
                                     f"noise predictions (precision {self.precision!r}; float32 may avoid overflow)")
        mean, std = stats.mean.to(result_device), stats.std().to(result_device)
        return SegmentationResult(mean, mean > 0.5, std, seeds, plan,
                                  torch.stack(stats.samples) if keep_samples else None)

    def _allocate(self, padded_volume: torch.Tensor, plan: SamplingPlan) -> _Buffers:
        n, device = plan.chunk_size, padded_volume.device
        coord_shape = self._coord_shape(padded_volume)
        model_input = torch.empty((n, self.planner.channels) + plan.window_shape, dtype=torch.float32, device=device)
        x0 = torch.empty((n, XT_CHANNELS) + plan.padded_shape, dtype=torch.float32, device=device)
        if not self.tiled:
            # image and coordinates are the same for every member: written once, here
            assemble_input(padded_volume, [[0, 0, 0]] * n, coord_shape=coord_shape, out=model_input)
            return _Buffers(padded_volume, coord_shape, model_input, x0)
        x = torch.empty((n, XT_CHANNELS) + plan.padded_shape, dtype=torch.float32, device=device)
        tiling = Tiling(plan.padded_shape, plan.window_shape, self.planner.overlap(plan.window_shape), device)
        return _Buffers(padded_volume, coord_shape, model_input, x0, x, torch.empty_like(x), tiling)

    def _run_chunk(self, buffers: _Buffers, seeds: list, plan: SamplingPlan, on_step) -> torch.Tensor:
        """Samples the members of `seeds` together; returns their x (n, 1, *padded)."""
        n = len(seeds)
        model_input, x0 = buffers.model_input[:n], buffers.x0[:n]
        if self.tiled:
            x, eps = buffers.x[:n], buffers.eps[:n]
            predict = lambda t: self._blended_noise(buffers, model_input, x, eps, t, plan)  # noqa: E731
        else:
            x = model_input[:, -XT_CHANNELS:]
            predict = lambda t: predict_noise(self.model, model_input, t, x.shape, self.precision)  # noqa: E731
        self._initial_noise(x, seeds)
        return denoise(self.scheduler, x, x0, predict, seeds, on_step)

    def _initial_noise(self, x: torch.Tensor, seeds: list) -> None:
        for j, s in enumerate(seeds):  # x_T of member j from its own seed, offset 0
            x[j].copy_(philox_normal(x.shape[1:], s, 0, device=x.device))

    def _blended_noise(self, buffers: _Buffers, model_input, x, eps, t, plan: SamplingPlan) -> torch.Tensor:
        """The noise prediction of the whole volume from its tiles, blended with smooth weights."""
        n, tiling = x.shape[0], buffers.tiling
        eps.zero_()
        for start, slices, ramps in tiling.tiles:
            window = (slice(None), slice(None)) + slices
            assemble_input(buffers.volume, [list(start)] * n, x[window], plan.window_shape,
                           coord_shape=buffers.coord_shape, out=model_input)
            tile_eps = predict_noise(self.model, model_input, t, (n, XT_CHANNELS) + plan.window_shape, self.precision)
            eps[window].add_(tile_eps.float() * tiling.weight(ramps))
        return eps.mul_(tiling.inverse_total)

    def _coord_shape(self, padded_volume: torch.Tensor) -> tuple:
        return self.coord_shape or tuple(padded_volume.shape[2:])


@contextlib.contextmanager
def _slabs_as_for(model, ratio: float):
    """While a probe of `ratio` times a window's voxels runs, the levels of a patchddm_fast
    U-Net run in slabs where they will on the window (nn.streaming: its tensors' bytes shrink
    with the probe, the threshold with them), so that the probe measures that pass's memory."""
    if not hasattr(model, "slab_min_bytes"):
        yield
        return
    from ..nn import streaming

    saved = model.slab_min_bytes
    model.slab_min_bytes = int((streaming.MIN_BYTES if saved is None else saved) * ratio)
    try:
        yield
    finally:
        model.slab_min_bytes = saved


def _module_tensors(model) -> list:
    if not isinstance(model, torch.nn.Module):
        return []
    return list(model.parameters()) + list(model.buffers())


def _model_attribute(model, name: str):
    """An attribute of the model or of its config (patchddm_fast.nn.UNet3D keeps them there)."""
    value = getattr(model, name, None)
    return value if value is not None else getattr(getattr(model, "config", None), name, None)


def _model_image_channels(model) -> int:
    in_channels = _model_attribute(model, "in_channels")
    return int(in_channels) - COORD_CHANNELS - XT_CHANNELS if in_channels is not None else 4


def _model_size_multiple(model) -> int:
    multiple = _model_attribute(model, "size_multiple")
    if multiple is not None:
        return int(multiple)
    channel_mult = _model_attribute(model, "channel_mult")
    return 2 ** (len(channel_mult) - 1) if channel_mult is not None else 1
