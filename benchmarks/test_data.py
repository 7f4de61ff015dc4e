"""Data throughput: patches per second of our loader vs the original's data path, and phantom
generation time.

    pytest benchmarks/test_data.py --benchmark-only [--paper-scale]

Sizes: 64^3 phantoms padded to 64^3 with 32^3 patches by default; --paper-scale (or a GPU
machine) uses BraTS-sized 240 x 240 x 155 phantoms padded to 256^3 with 128^3 patches.

Compared, per patch (group "patch"):
  ours-cached        PatchDataset item from the shared cache (crop + coordinates + x_t slot
                     written in one pass by assemble_input)
  ours-uncached      PatchDataset item decoding the case from disk (read, normalise, pad, assemble)
  original-memory    the original's path from a decoded case in memory: pad into a zero volume,
                     torch.cat the full-volume coordinate grid, crop, binarise the label
  original-disk      the same, reading the case from disk each time as the original does
and per loader batch (group "loader"): ours through a DataLoader with 2 workers, cached and not.
Each result's extra_info holds patches_per_s. Items are timed in this process with one torch
thread, as in a loader worker (PyTorch gives each worker one thread).
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from patchddm_fast.data import PatchDataset, find_cases, generate_phantom, make_patch_loader, write_phantoms
from patchddm_fast.data.patches import sample_offset

N_CASES = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sizes(paper_scale):
    if paper_scale:
        return dict(shape=(240, 240, 155), volume=(256, 256, 256), patch=(128, 128, 128), per_round=2)
    return dict(shape=(64, 64, 64), volume=(64, 64, 64), patch=(32, 32, 32), per_round=16)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, sizes):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, n=N_CASES, shape=sizes["shape"], seed=0)
    found, _ = find_cases(folder)
    return found


def _record(benchmark, patches: int):
    benchmark.extra_info["patches_per_s"] = patches / benchmark.stats.stats.mean


def _dataset(cases, sizes, cache_bytes):
    return PatchDataset(cases, patch_shape=sizes["patch"], volume_shape=sizes["volume"], cache_bytes=cache_bytes)


@pytest.mark.benchmark(group="patch")
def test_ours_cached(benchmark, cases, sizes):
    dataset = _dataset(cases, sizes, cache_bytes="auto")
    dataset.preload()
    numbers = itertools.count()
    per_round = sizes["per_round"]
    benchmark.pedantic(lambda: [dataset[next(numbers)] for _ in range(per_round)], rounds=5, warmup_rounds=1)
    _record(benchmark, per_round)


@pytest.mark.benchmark(group="patch")
def test_ours_uncached(benchmark, cases, sizes):
    dataset = _dataset(cases, sizes, cache_bytes=0)
    numbers = itertools.count()
    benchmark.pedantic(lambda: dataset[next(numbers)], rounds=5, warmup_rounds=1)
    _record(benchmark, 1)


class OriginalPath:
    """The original implementation's data path, step by step: float64 volumes stacked, a
    zero-padded 256-style volume, the full coordinate grid concatenated, then the crop."""

    def __init__(self, sizes):
        self.volume, self.patch = sizes["volume"], sizes["patch"]
        axes = [torch.linspace(-1, 1, n) for n in self.volume]
        self.coord_cache = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
        self.rng = np.random.default_rng(0)

    @staticmethod
    def read(case):
        return torch.stack([torch.tensor(nib.load(str(case.files[k])).get_fdata())
                            for k in ("t1", "t1ce", "t2", "flair", "seg")])

    def sample(self, stacked):
        shape = stacked.shape[1:]
        before = [(v - n) // 2 for v, n in zip(self.volume, shape)]
        where = tuple(slice(b, b + n) for b, n in zip(before, shape))
        image = torch.zeros((4,) + self.volume)
        image[(slice(None),) + where] = stacked[:-1]
        seg = torch.zeros((1,) + self.volume)
        seg[(slice(None),) + where] = stacked[-1:]
        image = torch.cat([image, self.coord_cache], dim=0)
        o = sample_offset(self.rng, self.volume, self.patch)
        crop = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(o, self.patch))
        return image[crop], (seg[crop] > 0).float()


@pytest.mark.benchmark(group="patch")
def test_original_memory(benchmark, cases, sizes):
    original = OriginalPath(sizes)
    decoded = [original.read(case) for case in cases]
    turn = itertools.cycle(decoded)
    per_round = sizes["per_round"]
    benchmark.pedantic(lambda: [original.sample(next(turn)) for _ in range(per_round)], rounds=5, warmup_rounds=1)
    _record(benchmark, per_round)


@pytest.mark.benchmark(group="patch")
def test_original_disk(benchmark, cases, sizes):
    original = OriginalPath(sizes)
    turn = itertools.cycle(cases)
    benchmark.pedantic(lambda: original.sample(original.read(next(turn))), rounds=5, warmup_rounds=1)
    _record(benchmark, 1)


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_loader_two_workers(benchmark, cases, sizes, cached):
    dataset = _dataset(cases, sizes, cache_bytes="auto" if cached else 0)
    if cached:
        dataset.preload()
    batch, batches = 2, (4 if cached else 1)
    loader = iter(make_patch_loader(dataset, batch, num_workers=2, pin_memory=torch.cuda.is_available()))
    next(loader)  # workers started
    benchmark.pedantic(lambda: [next(loader) for _ in range(batches)], rounds=5, warmup_rounds=1)
    _record(benchmark, batch * batches)


def _skip_large_unless_paper(shape, paper_scale):
    if shape[0] > 64 and not paper_scale:
        pytest.skip("BraTS-sized phantoms at paper scale only (--paper-scale or a GPU machine): 40 s on a CPU")


@pytest.mark.benchmark(group="phantom")
@pytest.mark.parametrize("shape", [(64, 64, 64), (240, 240, 155)], ids=["64^3", "240x240x155"])
def test_phantom_generation(benchmark, shape, paper_scale):
    _skip_large_unless_paper(shape, paper_scale)
    seeds = itertools.count()
    benchmark.pedantic(lambda: generate_phantom(shape, next(seeds)), rounds=3 if shape[0] > 64 else 10)


@pytest.mark.benchmark(group="phantom")
def test_phantom_writing_240(benchmark, tmp_path, paper_scale):
    _skip_large_unless_paper((240, 240, 155), paper_scale)
    seeds = itertools.count()
    benchmark.pedantic(lambda: write_phantoms(tmp_path, n=1, shape=(240, 240, 155), first=next(seeds) + 1), rounds=2)
