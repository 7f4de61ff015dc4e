"""The U-Net: fused ops and memory options against the plain-PyTorch baseline, side by side.

Training step = forward, MSE loss on the output, backward; forward = no-grad inference.
Every case records its peak memory in extra_info (CPU: peak RSS growth of one step in a fresh
process; GPU: max_memory_allocated) and, when its baseline ran earlier in the same session,
the ratios to it (time_ratio, memory_ratio: this case / baseline).

    pytest benchmarks/test_unet.py --benchmark-only                 # CPU: small and paper @ 64^3
    pytest benchmarks/test_unet.py --benchmark-only -k small        # the quick part only
    pytest benchmarks/test_unet.py --benchmark-only --benchmark-json=unet.json   # keep figures

On a GPU (or with --paper-scale) the paper's sizes run: 128^3 training under bf16 autocast,
256^3 inference fp32 baseline against bf16 fused.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.memory import cpu_peak_bytes, cuda_peak_bytes

# name -> UNet3D options (+ "bf16": run under bf16 autocast). "baseline" is the reference.
OPTIONS = {
    "baseline": dict(fused=False),
    "fused": dict(fused=True),
    "fused+cheap": dict(fused=True, checkpoint="cheap"),
    "fused+blocks": dict(fused=True, checkpoint="blocks"),
    "fused+channels_last": dict(fused=True, channels_last=True),
    "fused+cheap+channels_last": dict(fused=True, checkpoint="cheap", channels_last=True),
    "baseline+cheap": dict(fused=False, checkpoint="cheap"),
    "baseline+channels_last": dict(fused=False, channels_last=True),
    "baseline-bf16": dict(fused=False, bf16=True),
    "fused+cheap-bf16": dict(fused=True, checkpoint="cheap", bf16=True),
    "fused-bf16": dict(fused=True, bf16=True),
}


def setup_step(preset: str, size: int, option: str, train: bool, device: str = "cpu", batch: int = 1):
    """A workload for benchmarks.memory: one training step (or no-grad forward) of a preset."""
    from patchddm_fast.nn import PRESETS, UNet3D

    options = dict(OPTIONS[option])
    bf16 = options.pop("bf16", False)
    torch.manual_seed(0)
    model = UNet3D(PRESETS[preset], **options).to(device).train(train)
    config = model.config
    x = torch.randn(batch, config.in_channels, size, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, config.out_channels, size, size, size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def train_step():
        with autocast:
            out = model(x, t)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keeps the gradient buffers: steady-state memory

    def forward():
        with torch.no_grad(), autocast:
            model(x, t)

    return train_step if train else forward


_RESULTS: dict[tuple, tuple[float, int]] = {}


def _measure(benchmark, device, rounds, preset, size, option, train, baseline):
    run = setup_step(preset, size, option, train, device=device.type)
    if device.type == "cuda":
        run()
        peak = cuda_peak_bytes(run)
        sync = torch.cuda.synchronize
    else:
        peak = cpu_peak_bytes("benchmarks.test_unet:setup_step", preset=preset, size=size, option=option,
                              train=train)
        sync = lambda: None  # noqa: E731

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    case = (device.type, preset, size, train)
    _RESULTS[case + (option,)] = (seconds, peak)
    info = dict(preset=preset, size=size, option=option, train=train, peak_mib=round(peak / 2**20, 1),
                baseline=baseline)
    if case + (baseline,) in _RESULTS and option != baseline:
        base_seconds, base_peak = _RESULTS[case + (baseline,)]
        info.update(time_ratio=round(seconds / base_seconds, 3), memory_ratio=round(peak / base_peak, 3))
    benchmark.extra_info.update(info)


CPU_SMALL = ["baseline", "fused", "fused+cheap", "fused+blocks", "fused+channels_last", "baseline+cheap",
             "baseline+channels_last", "fused+cheap+channels_last"]
CPU_PAPER = ["baseline", "fused", "fused+cheap", "fused+blocks", "fused+channels_last", "baseline+cheap"]


@pytest.mark.parametrize("option", CPU_SMALL)
def test_cpu_small_train_64(benchmark, bench_device, option):
    if bench_device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")
    benchmark.group = "unet small 64^3 train cpu fp32"
    _measure(benchmark, bench_device, 3, "small", 64, option, True, "baseline")


@pytest.mark.parametrize("option", CPU_PAPER)
def test_cpu_paper_train_64(benchmark, bench_device, option):
    if bench_device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")
    benchmark.group = "unet paper 64^3 train cpu fp32"
    _measure(benchmark, bench_device, 2, "paper", 64, option, True, "baseline")


@pytest.mark.parametrize("option", ["baseline", "fused", "fused-bf16"])
def test_cpu_paper_forward_64(benchmark, bench_device, option):
    if bench_device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")
    benchmark.group = "unet paper 64^3 no-grad forward cpu"
    _measure(benchmark, bench_device, 2, "paper", 64, option, False, "baseline")


@pytest.mark.parametrize("option", ["baseline-bf16", "fused-bf16", "fused+cheap-bf16"])
def test_paper_train_128_bf16(benchmark, bench_device, paper_scale, option):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "unet paper 128^3 train bf16 autocast"
    _measure(benchmark, bench_device, 5, "paper", 128, option, True, "baseline-bf16")


@pytest.mark.parametrize("option", ["baseline", "fused", "fused-bf16"])
def test_paper_forward_256(benchmark, bench_device, paper_scale, option):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "unet paper 256^3 no-grad forward"
    _measure(benchmark, bench_device, 3, "paper", 256, option, False, "baseline")
