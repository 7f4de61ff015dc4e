"""Training throughput (patches per second) and peak memory: ours against the original's pattern,
side by side, one training step at a time (batch from cached volumes, noising, forward, backward,
AdamW step).

- baseline: the original's data path (pad the decoded case into the full volume, torch.cat the
  full-volume coordinate grid to it, crop the patch, binarise the label), x_t made with
  torch.randn_like and eager arithmetic, the model input assembled by torch.cat([crop, x_t]),
  the plain-PyTorch U-Net (fused=False), float32;
- ours: the trainer's path: PatchDataset items from its shared volume cache (crop, coordinates
  and the x_t slot written in one pass by assemble_input), the fused q_sample writing x_t in
  place, the fused U-Net, float32 (the trainer's diffusion_loss, one noise key per sample);
- ours-bf16 / ours-bf16-cheap (paper scale only): the same under bf16 autocast, and with the
  "cheap" activation checkpointing.

Every case records patches_per_s and its peak memory in extra_info (CPU: peak RSS growth of one
step in a fresh process, plus the peak of the step's live tensors, tensor_peak_mib, which is
exact and repeatable; GPU: max_memory_allocated), and its ratios to the baseline measured
earlier in the same session (speedup = baseline time / time, memory_ratio = peak / baseline).

    pytest benchmarks/test_train.py --benchmark-only                 # CPU: 64^3 patches of 128^3
    pytest benchmarks/test_train.py --benchmark-only --paper-scale   # + 128^3 of 256^3 (GPU default)
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from benchmarks.memory import cpu_peak_bytes, cuda_peak_bytes

VARIANTS = {  # name -> (ours, autocast dtype, UNet3D checkpoint option)
    "baseline": (False, None, "off"),
    "ours": (True, None, "off"),
    "ours-bf16": (True, torch.bfloat16, "off"),
    "ours-bf16-cheap": (True, torch.bfloat16, "cheap"),
}
SIZES = {  # patch edge -> (phantom grid, padded volume edge)
    64: ((96, 96, 96), 128),
    128: ((240, 240, 155), 256),
}
N_CASES = 2
_PHANTOMS: dict = {}


def _phantoms(shape):
    """Cases written once per process (a temporary folder removed at exit)."""
    from patchddm_fast.data import find_cases, write_phantoms

    if shape not in _PHANTOMS:
        folder = tempfile.TemporaryDirectory(prefix="patchddm_bench_train_")
        write_phantoms(folder.name, n=N_CASES, shape=shape, seed=0)
        _PHANTOMS[shape] = (folder, find_cases(folder.name)[0])
    return _PHANTOMS[shape][1]


def setup_step(variant: str, preset: str, patch: int, batch: int, device: str = "cpu"):
    """A workload for benchmarks.memory: one training step, data included."""
    from benchmarks.test_data import OriginalPath
    from patchddm_fast.data import PatchDataset
    from patchddm_fast.diffusion import NoiseSchedule
    from patchddm_fast.nn import PRESETS, UNet3D
    from patchddm_fast.diffusion import diffusion_loss
    from patchddm_fast.train.objective import sample_draws

    ours, dtype, checkpoint = VARIANTS[variant]
    shape, volume = SIZES[patch]
    cases = _phantoms(shape)
    schedule = NoiseSchedule.linear()
    torch.manual_seed(0)
    model = UNet3D(PRESETS[preset], fused=ours, checkpoint=checkpoint).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counter = iter(range(10**9))

    if ours:
        dataset = PatchDataset(cases, patch_shape=patch, volume_shape=volume, seed=0)
        dataset.preload()
        collate = torch.utils.data.default_collate

        def run():
            first = next(counter) * batch
            samples = collate([dataset[n] for n in range(first, first + batch)])
            inputs = samples.input.to(device, non_blocking=True)
            mask = samples.mask.to(device, non_blocking=True)
            timesteps, seeds = sample_draws(0, range(first, first + batch), schedule.num_timesteps)
            loss = diffusion_loss(model, inputs, mask, schedule, timesteps=timesteps, seed=seeds,
                                  precision=dtype or torch.float32)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    original = OriginalPath(dict(volume=(volume,) * 3, patch=(patch,) * 3))
    decoded = [original.read(case) for case in cases]
    alphas = schedule.alphas_cumprod.float()

    def run():
        crops, masks = zip(*(original.sample(decoded[(next(counter)) % len(decoded)]) for _ in range(batch)))
        image = torch.stack(crops).float().to(device)
        mask = torch.stack(masks).to(device)
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(mask)
        ab = alphas.to(device)[t].view(-1, 1, 1, 1, 1)
        x_t = ab.sqrt() * mask + (1 - ab).sqrt() * noise
        prediction = model(torch.cat([image, x_t], dim=1), t)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


_RESULTS: dict[tuple, tuple[float, int, int | None]] = {}


def _measure(benchmark, device, rounds, preset, patch, batch, variant):
    from patchddm_fast.diffusion.memory import forward_peak_bytes

    run = setup_step(variant, preset, patch, batch, device=device.type)
    tensor_peak = None
    run()  # warm-up: optimizer state, allocator pools, oneDNN / cuDNN plans
    if device.type == "cuda":
        peak = cuda_peak_bytes(run)
        sync = torch.cuda.synchronize
    else:
        peak = cpu_peak_bytes("benchmarks.test_train:setup_step", variant=variant, preset=preset, patch=patch,
                              batch=batch)
        tensor_peak = forward_peak_bytes(run)
        sync = lambda: None  # noqa: E731

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median
    case = (device.type, preset, patch, batch)
    _RESULTS[case + (variant,)] = (seconds, peak, tensor_peak)
    info = dict(preset=preset, patch=patch, batch=batch, variant=variant, patches_per_s=round(batch / seconds, 3),
                peak_mib=round(peak / 2**20, 1), threads=torch.get_num_threads(), cpus=os.cpu_count())
    if tensor_peak is not None:
        info.update(tensor_peak_mib=round(tensor_peak / 2**20, 1))
    if case + ("baseline",) in _RESULTS and variant != "baseline":
        base_seconds, base_peak, base_tensor_peak = _RESULTS[case + ("baseline",)]
        info.update(speedup=round(base_seconds / seconds, 3), memory_ratio=round(peak / base_peak, 3))
        if tensor_peak is not None and base_tensor_peak:
            info.update(tensor_memory_ratio=round(tensor_peak / base_tensor_peak, 3))
    benchmark.extra_info.update(info)
    assert math.isfinite(seconds)


@pytest.mark.parametrize("variant", ["baseline", "ours"])
@pytest.mark.parametrize("preset, batch", [("small", 2), ("paper", 1)], ids=["small-b2", "paper-b1"])
def test_cpu_train_step_64(benchmark, bench_device, paper_scale, preset, batch, variant):
    if bench_device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")
    if preset == "paper" and not paper_scale:  # 50 s a case on 2 cores: on request
        pytest.skip("the paper's network on the CPU: pass --paper-scale")
    benchmark.group = f"train step {preset} 64^3 patches cpu fp32"
    _measure(benchmark, bench_device, 2, preset, 64, batch, variant)


@pytest.mark.parametrize("variant", ["baseline", "ours", "ours-bf16", "ours-bf16-cheap"])
def test_paper_train_step_128(benchmark, bench_device, paper_scale, variant):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "train step paper 128^3 patches"
    _measure(benchmark, bench_device, 5, "paper", 128, 1, variant)
