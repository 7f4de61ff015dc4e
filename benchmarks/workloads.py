"""Workloads and measuring helpers shared by the benchmark files.

A workload is a function `setup(**kwargs) -> run`: setup builds the model and the inputs
(not measured), run() does the measured work once. benchmarks.memory can run any of them in a
fresh process for its peak RSS (give it "benchmarks.workloads:<name>"). A run may carry
`run.held`: the objects (modules, optimizers, tensors) it keeps alive between calls, whose
bytes count towards what a device must hold for the work (benchmarks.memory.held_bytes).

Baseline and ours, everywhere in the suite:
  baseline  the original PatchDDM pattern: the plain-PyTorch U-Net, the model input built
            with torch.cat([MR, coordinates, x_t]) at every step, the noise update (DDIM) and
            the forward noising (training) in eager PyTorch with a materialised noise tensor;
  ours      the fused U-Net, one preallocated model-input buffer written once, and the fused
            noise ops writing x_t straight into it.

The helpers at the end (`sync`, `time_call`, `check_then_time`, `record`, `measure`) give
every benchmark the same shape: check, warm up, peak memory, time, ratios to the baseline of
the same group.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

VARIANTS = ("baseline", "ours")
PRECISIONS = ("float32", "bfloat16")
STEPS, STEP_INDEX = 20, 1  # a DDIM step from the middle of the paper's 20-step run


def allocate(mib: int):
    """Touches `mib` MiB once: the calibration workload of the memory measurement."""

    def run():
        buffer = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        return float(buffer[-1])

    return run


# -- building blocks ---------------------------------------------------------------------------

def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _spatial(size, preset: str) -> tuple[int, int, int]:
    """size: an int (cube) or three ints, each a multiple of the preset's size_multiple."""
    from patchddm_fast.nn import PRESETS

    shape = (int(size),) * 3 if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    multiple = PRESETS[preset].size_multiple
    if len(shape) != 3 or any(s <= 0 or s % multiple for s in shape):
        raise ValueError(f"the {preset} U-Net needs three positive sizes, multiples of {multiple}; got {size!r}")
    return shape


def make_model(preset: str, variant: str, device: str, train: bool = False, checkpoint: str = "off",
               fused: bool | None = None):
    """The preset's U-Net, fused (ours; or as `fused` says) or plain PyTorch (baseline), with
    the same weights for the same seed. Its zero-initialised output layers are re-drawn so that outputs are not 0
    (a zero output would hide errors in the checks and skip work in some kernels)."""
    from patchddm_fast.nn import PRESETS, ResBlock, UNet3D

    _check_choice("variant", variant, VARIANTS)
    torch.manual_seed(0)
    model = UNet3D(PRESETS[preset], fused=variant == "ours" if fused is None else fused, checkpoint=checkpoint)
    zero_initialised = [block.out_layers[3] for block in model.modules() if isinstance(block, ResBlock)]
    for conv in zero_initialised + [model.out[2]]:
        torch.nn.init.normal_(conv.weight, std=0.02)
    if torch.device(device).type != "cpu":  # (.to swaps parameters, which fake tensors refuse)
        model.to(device)
    return model.train(train)


def autocast(device: str, precision: str):
    _check_choice("precision", precision, PRECISIONS)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def eager_ddim_step(x, eps, ab: float, ab_prev: float):
    """The original's DDIM update (guided-diffusion, eta = 0): x0 clipped, eps re-derived,
    sigma = 0 noise still drawn with randn_like and multiplied in, as its code does."""
    x0 = (math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps).clamp(-1, 1)
    eps = (math.sqrt(1 / ab) * x - x0) / math.sqrt(1 / ab - 1)
    sigma = 0.0
    mean = x0 * math.sqrt(ab_prev) + math.sqrt(1 - ab_prev - sigma**2) * eps
    return mean + sigma * torch.randn_like(x)


def _alpha_bars(scheduler, t: int) -> tuple[float, float]:
    prev = scheduler.previous_timestep(t)
    ab_prev = float(scheduler.alphas_cumprod[prev if prev >= 0 else 0])  # the original's last step
    return float(scheduler.alphas_cumprod[t]), ab_prev


# -- workloads ---------------------------------------------------------------------------------

def sampling_step(variant: str = "ours", preset: str = "small", size=32, members: int = 1,
                  precision: str = "float32", device: str = "cpu", fused: bool | None = None):
    """One no-grad DDIM step of full-volume sampling: `members` ensemble members batched.
    run() returns x_t after the step; ours and baseline start from the same x_t.
    fused: the U-Net (default: fused for ours, plain for the baseline); ours with fused=False
    is our sampling loop (buffer, fused update) around the plain network."""
    from patchddm_fast.diffusion import DDIMScheduler, NoiseSchedule
    from patchddm_fast.diffusion.sampling import predict_noise
    from patchddm_fast.ops import assemble_input, coord_encoding

    shape = _spatial(size, preset)
    model = make_model(preset, variant, device, fused=fused).eval()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn((1, 4) + shape, generator=generator).to(device)
    scheduler = DDIMScheduler(NoiseSchedule.linear()).set_timesteps(STEPS)
    t = int(scheduler.timesteps[STEP_INDEX])

    if variant == "ours":
        buffer = torch.empty((members, 8) + shape, device=device)
        assemble_input(image, [[0, 0, 0]] * members, out=buffer)  # once per volume, not per step
        buffer[:, 7:8].copy_(torch.randn((members, 1) + shape, generator=generator))
        x_t, x0 = buffer[:, 7:8], torch.empty((members, 1) + shape, device=device)

        def run():
            with torch.no_grad():
                eps = predict_noise(model, buffer, t, x_t.shape, precision)
                scheduler.step(eps, t, x_t, out=x_t, x0_out=x0)
            return x_t

        run.held = [model, buffer, x0, image]
        return run

    coords = coord_encoding(shape, (0, 0, 0), shape, device=device)[None]  # precomputed, as the original's cache
    state = {"x": torch.randn((members, 1) + shape, generator=generator).to(device)}
    ab, ab_prev = _alpha_bars(scheduler, t)
    timesteps = torch.full((members,), t, dtype=torch.int64, device=device)

    def run():
        with torch.no_grad():
            x = state["x"]
            model_input = torch.cat([image.expand(members, -1, -1, -1, -1),
                                     coords.expand(members, -1, -1, -1, -1), x], dim=1)
            with autocast(device, precision):
                eps = model(model_input, timesteps)
            state["x"] = eager_ddim_step(x, eps.float(), ab, ab_prev)
        return state["x"]

    run.held = [model, image, coords, state]
    return run


def training_step(variant: str = "ours", preset: str = "small", size=32, batch: int = 1,
                  precision: str = "float32", device: str = "cpu", checkpoint: str = "off",
                  baseline_noise: str = "randn"):
    """One training step on `batch` patches: forward noising, forward, MSE loss, backward,
    AdamW. run() returns the loss (detached).

    baseline: x_t = sqrt(ab) mask + sqrt(1 - ab) noise, noise = randn_like(mask), then
    torch.cat of the patch's MR channels, coordinates and x_t (as the original);
    baseline_noise="philox" draws the noise that ours draws instead, so that both compute the
    same loss (for checks). ours: the patch input written once into a buffer (as our data
    pipeline does) and diffusion_loss, which writes x_t into it with the fused q_sample and
    regenerates the noise for the loss; the trainer's fused AdamW (the original: PyTorch's
    default, a loop over the parameters).
    """
    from patchddm_fast.diffusion import NoiseSchedule, diffusion_loss
    from patchddm_fast.ops import coord_encoding, philox_normal

    _check_choice("baseline_noise", baseline_noise, ("randn", "philox"))
    noise_seed = 3

    shape = _spatial(size, preset)
    model = make_model(preset, variant, device, train=True, checkpoint=checkpoint)
    fused = variant == "ours" and torch.device(device).type in ("cpu", "cuda")  # as the trainer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    schedule = NoiseSchedule.linear()
    generator = torch.Generator().manual_seed(2)
    condition = torch.cat([torch.randn((batch, 4) + shape, generator=generator),
                           coord_encoding(shape, (0, 0, 0), shape)[None].expand(batch, -1, -1, -1, -1)], dim=1)
    mask = (torch.rand((batch, 1) + shape, generator=generator) > 0.9).float().to(device)
    timesteps = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)
    amp = autocast(device, precision)

    if variant == "ours":
        buffer = torch.empty((batch, 8) + shape, device=device)
        buffer[:, :7].copy_(condition)

        def run():
            with amp:
                loss = diffusion_loss(model, buffer, mask, schedule, timesteps=timesteps, seed=noise_seed)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        run.held = [model, optimizer, buffer, mask]
        return run

    condition = condition.to(device)
    ab = schedule.alpha_bar(timesteps).float().to(device).reshape(-1, 1, 1, 1, 1)
    t_device = timesteps.to(device)

    def run():
        if baseline_noise == "randn":
            noise = torch.randn_like(mask)
        else:
            noise = philox_normal(mask.shape, noise_seed, device=mask.device)
        x_t = ab.sqrt() * mask + (1 - ab).sqrt() * noise
        with amp:
            prediction = model(torch.cat([condition, x_t], dim=1), t_device)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    run.held = [model, optimizer, condition, mask]
    return run


def unet_pass(variant: str = "ours", preset: str = "small", size=32, batch: int = 1, precision: str = "float32",
              train: bool = False, device: str = "cpu"):
    """The U-Net alone: a no-grad forward, or (train) forward, MSE to a random target and
    backward. run() returns the output (forward) or the loss (train), detached."""
    shape = _spatial(size, preset)
    model = make_model(preset, variant, device, train=train)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((batch, model.config.in_channels) + shape, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    target = torch.randn((batch, model.config.out_channels) + shape, generator=generator).to(device)
    amp = autocast(device, precision)

    def forward():
        with torch.no_grad(), amp:
            return model(x, t)

    def train_step():
        with amp:
            out = model(x, t)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    run = train_step if train else forward
    run.held = [model, x, t, target]
    return run


def full_volume_sampling(variant: str = "ours", preset: str = "small", size=32, members: int = 5,
                         steps: int = STEPS, precision: str = "float32", device: str = "cpu", seed: int = 0):
    """Segmenting one volume: `steps` DDIM steps for each of `members` ensemble members, then
    the ensemble's mean and standard deviation. run() returns (mean, std).

    ours: FullVolumeSampler (buffer written once, members batched as memory allows, fused
    updates). baseline: the original's loop, one member at a time, torch.cat per step, eager
    DDIM update, then torch.stack of the samples for mean and std. Both start each member from
    the same x_T (Philox noise of the member's seed), so their results must agree.
    """
    from patchddm_fast.diffusion import DDIMScheduler, FullVolumeSampler, NoiseSchedule, member_seeds
    from patchddm_fast.diffusion.sampling import predict_noise
    from patchddm_fast.ops import coord_encoding, philox_normal

    shape = _spatial(size, preset)
    model = make_model(preset, variant, device).eval()
    generator = torch.Generator().manual_seed(4)
    volume = torch.randn((1, 4) + shape, generator=generator).to(device)

    if variant == "ours":
        scheduler = DDIMScheduler(NoiseSchedule.linear()).set_timesteps(steps)
        sampler = FullVolumeSampler(model, scheduler=scheduler, ensemble_size=members,
                                    precision=precision, progress=False)
        sampler.plan(volume)  # measures its memory per voxel once per sampler: setup, not sampling

        def run():
            result = sampler.sample(volume, seed=seed)
            return result.mean, result.std

        run.held = [model, volume]
        return run

    scheduler = DDIMScheduler(NoiseSchedule.linear()).set_timesteps(steps)
    coords = coord_encoding(shape, (0, 0, 0), shape, device=device)[None]
    seeds = member_seeds(seed, members)

    def run():
        samples = []
        with torch.no_grad():
            for member_seed in seeds:
                x = philox_normal((1, 1) + shape, member_seed, 0, device=device)
                for t in scheduler.timesteps.tolist():
                    eps = predict_noise(model, torch.cat([volume, coords, x], dim=1), t, x.shape, precision)
                    x = eager_ddim_step(x, eps.float(), *_alpha_bars(scheduler, t))
                samples.append(x[0, 0])
        stacked = torch.stack(samples)
        return stacked.mean(dim=0), stacked.std(dim=0, unbiased=False)

    run.held = [model, volume, coords]
    return run


# -- checking --------------------------------------------------------------------------------

# Largest relative error ||actual - expected|| / ||expected|| accepted against a float32
# reference: float32 arithmetic in another order lands far below 1e-4; one bf16 op between
# 1e-3 and 1e-2, and a whole network under bf16 autocast compounds that over its layers.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_matches(actual, expected, precision: str = "float32", what: str = "result") -> float:
    """Raises AssertionError unless every tensor of `actual` is finite and within the
    precision's tolerance of `expected` (tensors, or tuples of them)."""
    pairs = zip(actual, expected) if isinstance(actual, (tuple, list)) else [(actual, expected)]
    worst = 0.0
    for a, e in pairs:
        if tuple(a.shape) != tuple(e.shape):
            raise AssertionError(f"{what}: shape {tuple(a.shape)} instead of {tuple(e.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise AssertionError(f"{what}: contains NaN or inf")
        worst = max(worst, relative_error(a, e))
    if worst > TOLERANCE[precision]:
        raise AssertionError(f"{what}: relative error {worst:.2e} above the {precision} tolerance "
                             f"{TOLERANCE[precision]:.0e}")
    return worst


# -- measuring ---------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(run, device):
    """run, followed by a device synchronisation (what a timer around it must wait for)."""
    if torch.device(device).type != "cuda":
        return run

    def call():
        result = run()
        torch.cuda.synchronize()
        return result

    return call


def time_call(run, device, rounds: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each of `rounds` calls after `warmup` calls (for scripts outside pytest)."""
    call = timed(run, device)
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


_RESULTS: dict[tuple[str, str], dict] = {}


def record(benchmark, name: str, baseline: str | None = None, *, peak_bytes: int | None = None,
           statistic: str = "median", **info) -> dict:
    """Stores a finished benchmark's figures under (its group, name) and writes into its
    extra_info: name, seconds, peak_mib, the given info, and, when `baseline` of the same
    group ran earlier in the session, time_ratio and memory_ratio (this / baseline) and
    speedup (baseline / this)."""
    seconds = getattr(benchmark.stats.stats, statistic)
    entry = dict(name=name, seconds=seconds, peak_bytes=peak_bytes)
    _RESULTS[(benchmark.group, name)] = entry
    extra = dict(name=name, seconds=round(seconds, 6), **info)
    if peak_bytes is not None:
        extra["peak_mib"] = round(peak_bytes / 2**20, 1)
    base = _RESULTS.get((benchmark.group, baseline)) if baseline and baseline != name else None
    if base is not None:
        extra.update(time_ratio=round(seconds / base["seconds"], 3), speedup=round(base["seconds"] / seconds, 3))
        if peak_bytes and base["peak_bytes"]:
            extra["memory_ratio"] = round(peak_bytes / base["peak_bytes"], 3)
    benchmark.extra_info.update(extra)
    return entry


def check_then_time(benchmark, run, *, device, group: str, target: str | None = None, kwargs: dict | None = None,
                    rounds: int = 3, warmup_rounds: int = 1, check=None, peak: int | None = None) -> int | None:
    """Every benchmark's core: check, peak memory, warm-up, time. Returns the peak bytes.

    check: called first (e.g. compare run's result with a reference); it raises on failure.
    When it calls run, that call is a warm-up too: pass warmup_rounds=0 to skip another.
    Peak memory, unless `peak` gives a figure measured before: on CUDA
    torch.cuda.max_memory_allocated over one run (after a warm-up run); on the CPU the peak
    RSS growth of one run of `target` (a workload "module:function" called with `kwargs`) in
    a fresh process, when a target is given (else None).
    """
    from benchmarks.memory import cpu_peak_bytes, cuda_peak_bytes

    if check is not None:
        check()
    benchmark.group = group
    device = torch.device(device)
    if peak is None and device.type == "cuda":
        run()
        peak = cuda_peak_bytes(run)
    elif peak is None and target:
        peak = cpu_peak_bytes(target, **(kwargs or {}))
    benchmark.pedantic(timed(run, device), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return peak


def measure(benchmark, run, *, device, group: str, name: str, target: str | None = None,
            kwargs: dict | None = None, baseline: str | None = None, rounds: int = 3,
            warmup_rounds: int = 1, check=None, **info) -> dict:
    """The suite's standard benchmark: check_then_time, then record (arguments as there)."""
    peak = check_then_time(benchmark, run, device=device, group=group, target=target, kwargs=kwargs, rounds=rounds,
                           warmup_rounds=warmup_rounds, check=check)
    return record(benchmark, name, baseline, peak_bytes=peak, **info)
