"""The U-Net: fused ops and memory options against the plain-PyTorch baseline, side by side.

Training step = forward, MSE loss on the output, backward; forward = no-grad inference. The
baseline is UNet3D(fused=False) with no memory option: the original's computation.

Each case reports, in extra_info and in a table at the end of the session:
- time: the median step of this case and of the baseline timed in alternation with it (one
  baseline step before each round), so a change in the machine's load hits both alike;
  time_ratio = this / baseline.
- peak memory: CPU: peak RSS growth of one step in a fresh process (benchmarks.memory), and
  the peak of the live tensors of one step (exact, repeatable; tensor_peak_mib); GPU:
  max_memory_allocated. memory_ratio / tensor_memory_ratio = this / baseline.

    pytest benchmarks/test_unet.py --benchmark-only                  # CPU: paper preset @ 64^3
    pytest benchmarks/test_unet.py --benchmark-only -k small         # quick: small preset @ 32^3
    pytest benchmarks/test_unet.py --benchmark-only --benchmark-json=unet.json   # keep figures
    PATCHDDM_BENCH_THREADS=1 pytest ...     # fixed CPU threads (a shared, loaded machine)

On a GPU (or with --paper-scale) the paper's sizes run: 128^3 training under bf16 autocast
(baseline under the same autocast), and 256^3 no-grad forward (fp32 baseline against the fused
model in fp32 and under bf16 autocast).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest
import torch

from benchmarks.memory import cpu_peak_bytes, cuda_peak_bytes

# name -> UNet3D options (+ "bf16": run under bf16 autocast; "slab_planes": None runs the
# no-grad forward whole, as before the slab-by-slab pass).
OPTIONS = {
    "baseline": dict(fused=False),
    "baseline-bf16": dict(fused=False, bf16=True),
    "baseline+cheap": dict(fused=False, checkpoint="cheap"),
    "fused": dict(fused=True),
    "fused-whole": dict(fused=True, slab_planes=None),
    "fused-whole-bf16": dict(fused=True, slab_planes=None, bf16=True),
    "fused+cheap": dict(fused=True, checkpoint="cheap"),
    "fused+blocks": dict(fused=True, checkpoint="blocks"),
    "fused+channels_last": dict(fused=True, channels_last=True),
    "fused+cheap+channels_last": dict(fused=True, checkpoint="cheap", channels_last=True),
    "fused-bf16": dict(fused=True, bf16=True),
    "fused+cheap-bf16": dict(fused=True, checkpoint="cheap", bf16=True),
    "fused+blocks-bf16": dict(fused=True, checkpoint="blocks", bf16=True),
    "fused+cheap+channels_last-bf16": dict(fused=True, checkpoint="cheap", channels_last=True, bf16=True),
}


def _set_threads():
    # PATCHDDM_BENCH_THREADS=n: CPU threads for the steps (here and in the memory-measuring
    # child process); on a shared machine one thread avoids OpenMP waiting on a descheduled
    # thread, which otherwise dominates the timings.
    threads = os.environ.get("PATCHDDM_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def setup_step(preset: str, size: int, option: str, train: bool, device: str = "cpu", batch: int = 1):
    """A workload for benchmarks.memory: one training step (or no-grad forward) of a preset."""
    from patchddm_fast.nn import PRESETS, UNet3D

    options = dict(OPTIONS[option])
    bf16 = options.pop("bf16", False)
    whole = options.pop("slab_planes", "default") is None
    _set_threads()
    torch.manual_seed(0)
    model = UNet3D(PRESETS[preset], **options).to(device).train(train)
    if whole:
        model.slab_planes = None
    config = model.config
    x = torch.randn(batch, config.in_channels, size, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, config.out_channels, size, size, size, device=device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def train_step():
        with autocast():
            out = model(x, t)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keeps the gradient buffers: steady-state memory

    def forward():
        with torch.no_grad(), autocast():
            model(x, t)

    return train_step if train else forward


@contextlib.contextmanager
def _exact_rss():
    # glibc serves allocations under its (adaptive, up to 32 MiB) mmap threshold from heaps it
    # keeps after free, so RSS after a warm-up step already holds most of a step's activations
    # and the measured growth hides them (here: 528 MiB for a step with 1.37 GiB of live
    # tensors). A fixed threshold maps every allocation over 128 KiB fresh and returns it on
    # free, so the fresh process's peak RSS follows what the step allocates.
    previous = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=131072"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = previous


def _cpu_peak(preset, size, option, train):
    with _exact_rss():
        return cpu_peak_bytes("benchmarks.test_unet:setup_step", preset=preset, size=size, option=option,
                              train=train)


def _cuda_peak(preset, size, option, train):
    run = setup_step(preset, size, option, train, device="cuda")
    run()
    peak = cuda_peak_bytes(run)
    del run
    torch.cuda.empty_cache()
    return peak


def _tensor_peak(run):
    from patchddm_fast.diffusion.memory import forward_peak_bytes

    return forward_peak_bytes(run)


_PEAKS: dict[tuple, int] = {}          # (device, preset, size, train, option) -> peak bytes
_TENSOR_PEAKS: dict[tuple, int] = {}   # the same for the live tensors (CPU)
_ROWS: list[dict] = []


def _peak(device, preset, size, option, train):
    key = (device.type, preset, size, train, option)
    if key not in _PEAKS:
        measure = _cuda_peak if device.type == "cuda" else _cpu_peak
        _PEAKS[key] = measure(preset, size, option, train)
    return _PEAKS[key]


def _measure(benchmark, device, rounds, preset, size, option, train, baseline):
    peak, base_peak = _peak(device, preset, size, option, train), _peak(device, preset, size, baseline, train)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run = setup_step(preset, size, option, train, device=device.type)
    base_run = setup_step(preset, size, baseline, train, device=device.type) if option != baseline else None
    base_seconds = []

    def time_baseline():  # pedantic's untimed setup: one baseline step before each round
        if base_run is not None:
            sync()
            start = time.perf_counter()
            base_run()
            sync()
            base_seconds.append(time.perf_counter() - start)

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, setup=time_baseline, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    base = statistics.median(base_seconds[-rounds:]) if base_run is not None else seconds

    row = dict(preset=preset, size=size, mode="train" if train else "forward", option=option, baseline=baseline,
               seconds=round(seconds, 4), baseline_seconds=round(base, 4), time_ratio=round(seconds / base, 3),
               peak_mib=round(peak / 2**20, 1), memory_ratio=round(peak / base_peak, 3),
               threads=torch.get_num_threads(), load_average=round(os.getloadavg()[0], 2))
    if device.type == "cpu":  # exact and repeatable, where RSS is neither
        key = (preset, size, train)
        _TENSOR_PEAKS[key + (option,)] = tensor_peak = _tensor_peak(run)
        if base_run is not None and key + (baseline,) not in _TENSOR_PEAKS:
            _TENSOR_PEAKS[key + (baseline,)] = _tensor_peak(base_run)
        base_tensor_peak = _TENSOR_PEAKS[key + (baseline,)]
        row.update(tensor_peak_mib=round(tensor_peak / 2**20, 1),
                   tensor_memory_ratio=round(tensor_peak / base_tensor_peak, 3))
    benchmark.extra_info.update(row)
    _ROWS.append(dict(row, device=device.type))


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Prints the side-by-side figures of every case that ran, at the end of the module."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not _ROWS or reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        _write_summary(reporter)


def _write_summary(reporter):
    reporter.write_line("")
    reporter.write_line("U-Net, this case / baseline (timed in alternation; peak memory of one step):")
    header = (f"{'case':44s} {'option':32s} {'time s':>8s} {'base s':>8s} {'time':>6s} "
              f"{'peak MiB':>9s} {'memory':>7s} {'tensors MiB':>12s} {'tensors':>8s}")
    reporter.write_line(header)
    for r in _ROWS:
        case = f"{r['device']} {r['preset']} {r['size']}^3 {r['mode']} vs {r['baseline']}"
        tensors = (f"{r['tensor_peak_mib']:12.1f} {r['tensor_memory_ratio']:8.3f}" if "tensor_peak_mib" in r
                   else f"{'-':>12s} {'-':>8s}")
        reporter.write_line(f"{case:44s} {r['option']:32s} {r['seconds']:8.2f} {r['baseline_seconds']:8.2f} "
                            f"{r['time_ratio']:6.3f} {r['peak_mib']:9.1f} {r['memory_ratio']:7.3f} {tensors}")
    reporter.write_line(f"threads {_ROWS[-1]['threads']}, 1-min load average at the end "
                        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


def _cpu_only(device):
    if device.type != "cpu":
        pytest.skip("the CPU figures are measured on a machine without a GPU")


CPU_TRAIN = ["baseline", "fused", "fused+cheap", "fused+blocks", "fused+cheap+channels_last"]
CPU_FORWARD = ["baseline", "fused", "fused-bf16"]
CPU_FORWARD_128 = ["baseline", "fused-whole", "fused", "fused-whole-bf16", "fused-bf16"]


@pytest.mark.parametrize("option", ["baseline", "fused", "fused+cheap", "fused+blocks"])
def test_cpu_small_train_32(benchmark, bench_device, option):
    _cpu_only(bench_device)
    benchmark.group = "unet small 32^3 train cpu fp32"
    _measure(benchmark, bench_device, 5, "small", 32, option, True, "baseline")


def _paper_preset_on_cpu(paper_scale: bool) -> None:
    # The paper's 24M-parameter network takes 20-80 s per case on a 2-core CPU: with it the
    # suite ran 19 minutes, so it runs on request and the default suite stays under 10.
    if not paper_scale:
        pytest.skip("the paper's network on the CPU: pass --paper-scale")


@pytest.mark.parametrize("option", CPU_TRAIN)
def test_cpu_paper_train_64(benchmark, bench_device, paper_scale, option):
    _cpu_only(bench_device)
    _paper_preset_on_cpu(paper_scale)
    benchmark.group = "unet paper 64^3 train cpu fp32"
    _measure(benchmark, bench_device, 3, "paper", 64, option, True, "baseline")


@pytest.mark.parametrize("option", CPU_FORWARD)
def test_cpu_paper_forward_64(benchmark, bench_device, paper_scale, option):
    _cpu_only(bench_device)
    _paper_preset_on_cpu(paper_scale)
    benchmark.group = "unet paper 64^3 no-grad forward cpu"
    _measure(benchmark, bench_device, 3, "paper", 64, option, False, "baseline")


@pytest.mark.parametrize("option", CPU_FORWARD_128)
def test_cpu_paper_forward_128(benchmark, bench_device, paper_scale, option):
    # Whole-volume sampling's memory: the slab-by-slab forward against the whole-tensor one
    # and the original, at the paper's patch size (20-30 s a pass on 2 cores).
    _cpu_only(bench_device)
    _paper_preset_on_cpu(paper_scale)
    benchmark.group = "unet paper 128^3 no-grad forward cpu, vs fp32 baseline"
    _measure(benchmark, bench_device, 2, "paper", 128, option, False, "baseline")


@pytest.mark.parametrize("option", ["baseline-bf16", "fused-bf16", "fused+cheap-bf16", "fused+blocks-bf16",
                                    "fused+cheap+channels_last-bf16"])
def test_paper_train_128_bf16(benchmark, bench_device, paper_scale, option):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "unet paper 128^3 train bf16 autocast"
    _measure(benchmark, bench_device, 5, "paper", 128, option, True, "baseline-bf16")


@pytest.mark.parametrize("option", ["baseline", "fused-whole", "fused", "baseline-bf16", "fused-bf16"])
def test_paper_forward_256(benchmark, bench_device, paper_scale, option):
    if not paper_scale:
        pytest.skip("paper scale: on a GPU, or pass --paper-scale")
    benchmark.group = "unet paper 256^3 no-grad forward, vs fp32 baseline"
    _measure(benchmark, bench_device, 3, "paper", 256, option, False, "baseline")
