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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ops import assemble_input, philox_normal
from .memory import device_free_bytes, format_bytes, forward_peak_bytes, probe_shape
from ..precision import precision_name
from .sampling import predict_noise
from .schedule import NoiseSchedule
from .schedulers import DDIMScheduler
from .tiling import Tiling

COORD_CHANNELS = 3
XT_CHANNELS = 1
FLOAT_BYTES = 4  # the buffer, x_t and the statistics are float32 whatever the model's precision


class VolumeTooLargeError(MemoryError):
    """Even one ensemble member does not fit into the memory available."""


def member_seeds(seed: int, count: int) -> list[int]:
    """The seed of each ensemble member, a function of (seed, member index) only."""
    seeds = []
    for m in range(count):
        low, high = np.random.SeedSequence(seed, spawn_key=(m,)).generate_state(2, np.uint32)
        seeds.append((int(high) << 32 | int(low)) & (2**63 - 1))
    return seeds


@dataclass(frozen=True)
class SamplingPlan:
    """How a volume will be sampled: its padding, windows and ensemble chunks."""
    shape: tuple            # the input's spatial shape
    padded_shape: tuple     # what the network sees (a multiple of size_multiple on each axis)
    pad_before: tuple       # voxels of padding before the input on each axis
    window_shape: tuple     # the network's input size: padded_shape, or the tile shape
    num_windows: int        # 1, or the number of tiles
    chunk_size: int         # ensemble members per forward pass
    member_bytes: int       # memory of one more member in a chunk (estimated)
    fixed_bytes: int        # memory independent of the chunk size
    available_bytes: int    # memory the plan may use

    @property
    def crop(self) -> tuple:
        return tuple(slice(b, b + n) for b, n in zip(self.pad_before, self.shape))


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


class FullVolumeSampler:
    """Samples segmentations of whole volumes with an ensemble, on the fused ops.

    model: model(x, timesteps) -> predicted noise, x = [image (C), coordinates (3), x_t (1)].
    steps, eta: DDIM with `steps` steps (the original PatchDDM sampler when eta = 0);
        or `scheduler`: any DDIMScheduler / DDPMScheduler (its timesteps as set).
    ensemble_size: samples per volume (the paper: 1 to 15); mean, mask, std come from them.
    precision: 'float32' (default), 'bfloat16' or 'float16' autocast for the network.
    image_channels: MR channels of a volume (default: the model's in_channels - 4, else 4).
    size_multiple: every spatial size the network accepts is a multiple of it (default from
        the model: size_multiple attribute, or 2^(len(channel_mult) - 1); else 1).
    pad_to: a minimum padded shape, e.g. (256, 256, 256) to give the coordinates of the
        training volumes; coord_shape: the shape the coordinates are normalised by (default
        the padded shape).
    memory_budget: bytes to plan with (default: free device memory, or available RAM on the
        CPU); memory_fraction of it is used. max_batch caps the members per pass;
        member_bytes overrides the estimate of one member's memory.
    tiled: run overlapping windows of tile_shape (a multiple of size_multiple) overlapping by
        tile_overlap voxels (default a quarter of the tile) instead of the whole volume.
    progress: a tqdm bar over steps and members.
    """

    def __init__(self, model, *, steps: int = 20, eta: float = 0.0, scheduler=None, ensemble_size: int = 1,
                 precision: str = "float32", image_channels: int | None = None, size_multiple: int | None = None,
                 pad_to=None, coord_shape=None, memory_budget: int | None = None, memory_fraction: float = 0.9,
                 max_batch: int | None = None, member_bytes: int | None = None, tiled: bool = False,
                 tile_shape=(128, 128, 128), tile_overlap=None, progress: bool = True):
        if scheduler is None:
            scheduler = DDIMScheduler(NoiseSchedule.linear(), eta=eta).set_timesteps(steps)
        self.model = model
        self.scheduler = scheduler
        self.ensemble_size = _positive_int("ensemble_size", ensemble_size)
        self.precision = precision_name(precision)
        self.image_channels = image_channels if image_channels is not None else _model_image_channels(model)
        self.size_multiple = _positive_int("size_multiple", size_multiple or _model_size_multiple(model))
        self.pad_to = _triple("pad_to", pad_to) if pad_to is not None else None
        self.coord_shape = _triple("coord_shape", coord_shape) if coord_shape is not None else None
        self.memory_budget = memory_budget
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must lie in (0, 1], got {memory_fraction}")
        self.memory_fraction = memory_fraction
        self.max_batch = _positive_int("max_batch", max_batch) if max_batch is not None else None
        self.member_bytes = member_bytes
        self.tiled = bool(tiled)
        self.tile_shape = _triple("tile_shape", tile_shape)
        if any(n % self.size_multiple for n in self.tile_shape):
            raise ValueError(f"tile_shape {self.tile_shape} must be a multiple of size_multiple {self.size_multiple}")
        self.tile_overlap = _triple("tile_overlap", tile_overlap) if tile_overlap is not None else None
        self.progress = progress
        self._forward_bytes_per_voxel: dict = {}

    # -- planning --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        parameter = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return parameter.device if parameter is not None else torch.device("cpu")

    def plan(self, volume: torch.Tensor, ensemble_size: int | None = None) -> SamplingPlan:
        """The padding, windows and chunking `sample` would use for this volume.

        Runs the network once on a small probe volume to measure its memory per voxel (and to
        check its output shape before any long computation)."""
        volume = self._check_volume(volume)
        return self._plan(self._padded(volume), tuple(volume.shape[2:]), ensemble_size or self.ensemble_size)

    def _plan(self, padded_volume: torch.Tensor, shape: tuple, ensemble_size: int) -> SamplingPlan:
        padded = tuple(padded_volume.shape[2:])
        window = tuple(min(t, p) for t, p in zip(self.tile_shape, padded)) if self.tiled else padded
        channels = self.image_channels + COORD_CHANNELS + XT_CHANNELS
        voxels, window_voxels = math.prod(padded), math.prod(window)
        if self.member_bytes is not None:
            per_member = int(self.member_bytes)
        else:
            forward = self._forward_bytes(padded_volume, window) * window_voxels
            # a member's model-input (or tile) buffer, x0 and, tiled, its x_t and blended noise
            own = channels * window_voxels + (3 if self.tiled else 1) * voxels
            per_member = int(forward + own * FLOAT_BYTES)
        # the padded volume, the mean and M2 accumulators and, tiled, the blend weights
        fixed = (self.image_channels + 2 + (1 if self.tiled else 0)) * voxels * FLOAT_BYTES
        available = int(device_free_bytes(self.device, self.memory_budget) * self.memory_fraction)
        chunk = min(ensemble_size, self.max_batch or ensemble_size, (available - fixed) // max(per_member, 1))
        plan = SamplingPlan(
            shape=shape, padded_shape=padded, pad_before=tuple((p - n) // 2 for p, n in zip(padded, shape)),
            window_shape=window, num_windows=Tiling.count(padded, window, self._overlap(window)) if self.tiled else 1,
            chunk_size=max(chunk, 0), member_bytes=per_member, fixed_bytes=fixed, available_bytes=available)
        if chunk < 1:
            raise VolumeTooLargeError(self._too_large_message(plan))
        return plan

    def _forward_bytes(self, padded_volume: torch.Tensor, window: tuple) -> float:
        """Peak bytes per voxel of one member's forward pass, measured on a probe volume."""
        probe = probe_shape(window, self.size_multiple)
        key = (probe, self.precision)
        if key not in self._forward_bytes_per_voxel:
            channels = self.image_channels + COORD_CHANNELS + XT_CHANNELS
            x = torch.zeros((1, channels) + probe, dtype=torch.float32, device=padded_volume.device)
            assemble_input(padded_volume, [0, 0, 0], patch_shape=probe, coord_shape=self._coord_shape(padded_volume),
                           out=x)
            t = int(self.scheduler.timesteps[0])
            external = [x, *_module_tensors(self.model)]
            with torch.no_grad():
                peak = forward_peak_bytes(
                    lambda: predict_noise(self.model, x, t, (1, XT_CHANNELS) + probe, self.precision), external)
            self._forward_bytes_per_voxel[key] = peak / math.prod(probe)
        return self._forward_bytes_per_voxel[key]

    def _too_large_message(self, plan: SamplingPlan) -> str:
        need = plan.member_bytes + plan.fixed_bytes
        where = "tile" if self.tiled else "volume"
        advice = []
        if self.precision == "float32":
            advice.append("precision='bfloat16'")
        if not self.tiled:
            advice.append(f"tiled=True with a smaller tile_shape (a multiple of {self.size_multiple})")
        else:
            advice.append("a smaller tile_shape")
        source = "the memory_budget" if self.memory_budget is not None else f"free {self.device.type} memory"
        return (f"FullVolumeSampler: one ensemble member on a {where} of {plan.window_shape} (padded volume "
                f"{plan.padded_shape}, {self.precision}) needs about {format_bytes(need)}, but only "
                f"{format_bytes(plan.available_bytes)} is available ({self.memory_fraction:.0%} of {source}). "
                f"Try {' or '.join(advice)}.")

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
            seeds = member_seeds(seed, _positive_int("ensemble_size", ensemble_size or self.ensemble_size))
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("FullVolumeSampler.sample: seeds is empty")
        if getattr(self.model, "training", False):
            warnings.warn("FullVolumeSampler: the model is in training mode (dropout active, samples not "
                          "reproducible); call model.eval() first", stacklevel=2)
        checked = self._check_volume(volume)
        result_device, volume = volume.device, checked
        padded_volume = self._padded(volume)
        plan = self._plan(padded_volume, tuple(volume.shape[2:]), len(seeds))

        mean = torch.zeros(plan.shape, dtype=torch.float32, device=padded_volume.device)
        m2 = torch.zeros_like(mean)
        samples = [] if keep_samples else None
        timesteps = self.scheduler.timesteps.tolist()
        bar = tqdm(total=len(seeds) * len(timesteps), desc="sampling", unit="step", disable=not self.progress)
        run_chunk = self._run_chunk_tiled if self.tiled else self._run_chunk_whole
        state = self._allocate(padded_volume, plan)
        count = 0
        for start in range(0, len(seeds), plan.chunk_size):
            chunk_seeds = seeds[start:start + plan.chunk_size]
            bar.set_postfix_str(f"members {start + 1}-{start + len(chunk_seeds)} of {len(seeds)}")
            x = run_chunk(state, chunk_seeds, plan, timesteps, bar)
            for j in range(len(chunk_seeds)):  # member by member: the same arithmetic for any chunking
                member = x[j, 0][plan.crop]
                count += 1
                delta = member - mean
                mean.add_(delta / count)
                m2.add_(delta * (member - mean))
                if keep_samples:
                    samples.append(member.to(result_device, copy=True))
        bar.close()
        if not bool(torch.isfinite(mean).all()):
            raise FloatingPointError("FullVolumeSampler: the samples contain NaN or inf: the model produced non-finite "
                                     f"noise predictions (precision {self.precision!r}; float32 may avoid overflow)")
        std = (m2 / count).sqrt()
        mean, std = mean.to(result_device), std.to(result_device)
        return SegmentationResult(mean, mean > 0.5, std, seeds, plan,
                                  torch.stack(samples) if keep_samples else None)

    def _allocate(self, padded_volume: torch.Tensor, plan: SamplingPlan) -> dict:
        """The buffers of a run, allocated once for the largest chunk."""
        n, device = plan.chunk_size, padded_volume.device
        channels = self.image_channels + COORD_CHANNELS + XT_CHANNELS
        state = {"volume": padded_volume, "coord_shape": self._coord_shape(padded_volume)}
        buffer = torch.empty((n, channels) + plan.window_shape, dtype=torch.float32, device=device)
        if self.tiled:
            state["tile_buffer"] = buffer
            state["x"] = torch.empty((n, XT_CHANNELS) + plan.padded_shape, dtype=torch.float32, device=device)
            state["eps"] = torch.empty_like(state["x"])
            state["tiling"] = self._tiling(plan.padded_shape, plan.window_shape, device)
        else:
            # image and coordinates are the same for every member: written once, here
            assemble_input(padded_volume, [[0, 0, 0]] * n, coord_shape=state["coord_shape"], out=buffer)
            state["buffer"] = buffer
        state["x0"] = torch.empty((n, XT_CHANNELS) + plan.padded_shape, dtype=torch.float32, device=device)
        return state

    def _initial_noise(self, x: torch.Tensor, seeds: list) -> None:
        for j, s in enumerate(seeds):
            x[j].copy_(philox_normal(x.shape[1:], s, 0, device=x.device))

    def _update(self, eps, t, i, x, x0, seeds) -> None:
        """The noise update of step i, written into x in place."""
        if not self.scheduler.draws_noise:
            self.scheduler.step(eps, t, x, out=x, x0_out=x0)
            return
        offset = (i + 1) * x[0].numel()
        for j, s in enumerate(seeds):  # each member's noise from its own seed
            self.scheduler.step(eps[j:j + 1], t, x[j:j + 1], seed=s, offset=offset, out=x[j:j + 1], x0_out=x0[j:j + 1])

    def _run_chunk_whole(self, state, seeds, plan, timesteps, bar) -> torch.Tensor:
        n = len(seeds)
        buffer = state["buffer"][:n]
        x, x0 = buffer[:, -XT_CHANNELS:], state["x0"][:n]
        self._initial_noise(x, seeds)
        for i, t in enumerate(timesteps):
            eps = predict_noise(self.model, buffer, t, x.shape, self.precision)
            self._update(eps, t, i, x, x0, seeds)
            bar.update(n)
        return x

    def _run_chunk_tiled(self, state, seeds, plan, timesteps, bar) -> torch.Tensor:
        n = len(seeds)
        x, eps, x0 = state["x"][:n], state["eps"][:n], state["x0"][:n]
        buffer, tiling = state["tile_buffer"][:n], state["tiling"]
        self._initial_noise(x, seeds)
        for i, t in enumerate(timesteps):
            eps.zero_()
            for start, slices, ramps in tiling.tiles:
                window = (slice(None), slice(None)) + slices
                assemble_input(state["volume"], [list(start)] * n, x[window], plan.window_shape,
                               coord_shape=state["coord_shape"], out=buffer)
                tile_eps = predict_noise(self.model, buffer, t, (n, XT_CHANNELS) + plan.window_shape, self.precision)
                eps[window].add_(tile_eps.float() * tiling.weight(ramps))
            eps.mul_(tiling.inverse_total)
            self._update(eps, t, i, x, x0, seeds)
            bar.update(n)
        return x

    # -- inputs ----------------------------------------------------------------------------------

    def _check_volume(self, volume) -> torch.Tensor:
        name = "FullVolumeSampler"
        if not isinstance(volume, torch.Tensor):
            raise TypeError(f"{name}: the volume must be a torch.Tensor, got {type(volume).__name__}")
        if volume.dim() == 4:
            volume = volume.unsqueeze(0)
        if volume.dim() != 5 or volume.shape[0] != 1:
            raise ValueError(f"{name}: the volume must be (C, D, H, W) or (1, C, D, H, W) (one volume at a time), "
                             f"got shape {tuple(volume.shape)}")
        if not volume.is_floating_point():
            raise TypeError(f"{name}: the volume must be floating point, got {volume.dtype}")
        if volume.shape[1] != self.image_channels:
            raise ValueError(f"{name}: the volume has {volume.shape[1]} channels, but the model takes "
                             f"{self.image_channels} image channels (then {COORD_CHANNELS} coordinate channels "
                             "and x_t)")
        if min(volume.shape[2:]) < 1:
            raise ValueError(f"{name}: the volume is empty, shape {tuple(volume.shape)}")
        finite = torch.isfinite(volume)
        if not bool(finite.all()):
            bad = (~finite).flatten(2).sum(dim=2)[0].tolist()
            channels = [c for c, k in enumerate(bad) if k]
            raise ValueError(f"{name}: the volume contains {sum(bad)} NaN or infinite voxels (channels {channels}); "
                             "fill them (e.g. with 0, the background) before sampling")
        return volume.to(device=self.device, dtype=torch.float32)

    def _padded(self, volume: torch.Tensor) -> torch.Tensor:
        shape = tuple(volume.shape[2:])
        least = tuple(max(n, p) for n, p in zip(shape, self.pad_to or shape))
        if self.tiled:
            least = tuple(max(n, t) for n, t in zip(least, self.tile_shape))
        padded = tuple(self.size_multiple * math.ceil(n / self.size_multiple) for n in least)
        if padded == shape:
            return volume
        pad = []
        for n, p in reversed(list(zip(shape, padded))):  # F.pad lists the last axis first
            pad += [(p - n) // 2, p - n - (p - n) // 2]
        return torch.nn.functional.pad(volume, pad)

    def _coord_shape(self, padded_volume: torch.Tensor) -> tuple:
        return self.coord_shape or tuple(padded_volume.shape[2:])

    def _overlap(self, window: tuple) -> tuple:
        overlap = self.tile_overlap or tuple(w // 4 for w in window)
        return tuple(min(o, w - 1) for o, w in zip(overlap, window))

    def _tiling(self, padded: tuple, window: tuple, device) -> Tiling:
        return Tiling(padded, window, self._overlap(window), device)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _triple(name: str, value) -> tuple:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values):
        raise ValueError(f"{name} must be an int or three non-negative ints, got {value!r}")
    return tuple(int(v) for v in values)


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
