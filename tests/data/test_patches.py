"""Patch offsets, the patch dataset's samples, their determinism, the cache and the loader."""

import gzip

import numpy as np
import pytest
import torch

from patchddm_fast.data import PatchDataset, find_cases, make_patch_loader, prepare_case
from patchddm_fast.data.patches import StreamSampler, offset_ranges, sample_offset


def test_offset_ranges_of_the_original():
    assert offset_ranges((256, 256, 256), (128, 128, 128)) == [(32, 96)] * 3
    assert offset_ranges((64, 48, 32), (32, 32, 32)) == [(8, 24), (4, 12), (0, 0)]
    with pytest.raises(ValueError, match="does not fit"):
        offset_ranges((64, 64, 16), (32, 32, 32))


@pytest.mark.parametrize("volume, patch", [(256, 128), (64, 32), (40, 13)])
def test_offsets_stay_inside_and_are_centre_biased(volume, patch):
    rng = np.random.default_rng(0)
    offsets = np.array([sample_offset(rng, (volume,) * 3, (patch,) * 3) for _ in range(6000)])
    room = volume - patch
    assert offsets.min() >= 0 and offsets.max() <= room
    if room <= 32:  # both ends are reachable (rare for large rooms: 1 / 3201 per draw at 128)
        assert offsets.min() == 0 and offsets.max() == room
    counts = np.bincount(offsets.ravel(), minlength=room + 1) / offsets.size
    quarter = room // 4
    assert offsets.mean() == pytest.approx(room / 2, abs=0.03 * room)
    # Trapezoid: flat at 1 / (room - quarter + 1) in the middle, ramping down towards the edges.
    middle = counts[quarter:room - quarter + 1].mean()
    assert middle == pytest.approx(1 / (room - quarter + 1), rel=0.1)
    edges = np.r_[counts[:max(1, quarter // 2)], counts[room - max(1, quarter // 2) + 1:]].mean()
    assert edges < 0.6 * middle


def test_stream_sampler_ranks_cover_the_single_process_stream():
    single = list(StreamSampler(10, num_samples=8))
    ranks = [list(StreamSampler(10, rank=r, world_size=2, num_samples=4)) for r in range(2)]
    assert single == list(range(10, 18))
    assert sorted(ranks[0] + ranks[1]) == single
    with pytest.raises(ValueError, match="rank"):
        StreamSampler(rank=2, world_size=2)


@pytest.fixture
def phantom_cases(tmp_path):
    from patchddm_fast.data import write_phantoms
    write_phantoms(tmp_path, n=3, shape=(24, 24, 20), seed=1)
    cases, _ = find_cases(tmp_path)
    return cases


def _original_coordinates(volume_shape):
    """The original's coordinate channels: meshgrid of linspace(-1, 1, N) per axis."""
    axes = [torch.linspace(-1, 1, n) for n in volume_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def test_sample_is_crop_plus_coordinates_of_the_full_volume(phantom_cases):
    dataset = PatchDataset(phantom_cases, patch_shape=(16, 12, 8), volume_shape=(32, 28, 24), seed=4, cache_bytes=0)
    coords = _original_coordinates((32, 28, 24))
    for number in (0, 1, 5, 7):
        sample = dataset[number]
        assert sample.input.shape == (8, 16, 12, 8) and sample.input.dtype == torch.float32
        assert sample.mask.shape == (1, 16, 12, 8) and sample.offset.dtype == torch.int64
        prepared = prepare_case(phantom_cases[sample.case_index], (32, 28, 24))
        o = sample.offset.tolist()
        crop = (slice(o[0], o[0] + 16), slice(o[1], o[1] + 12), slice(o[2], o[2] + 8))
        assert torch.equal(sample.input[:4], prepared.image[(slice(None),) + crop])
        # Coordinates in [-1, 1] from two float32 formulas: a few ulps (6e-8 each) apart.
        torch.testing.assert_close(sample.input[4:7], coords[(slice(None),) + crop], rtol=0, atol=1e-6)
        assert not sample.input[7].any()
        assert torch.equal(sample.mask[0], (prepared.label[crop] > 0).float())


def test_samples_depend_only_on_seed_and_number(phantom_cases):
    first = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, seed=0, cache_bytes=0)
    again = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, seed=0, cache_bytes=0)
    other = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, seed=1, cache_bytes=0)
    for n in (0, 4, 11):
        a, b = first[n], again[n]
        assert torch.equal(a.input, b.input) and torch.equal(a.offset, b.offset) and a.case_index == b.case_index
    offsets = lambda ds: [ds[n].offset.tolist() for n in range(6)]  # noqa: E731
    assert offsets(first) != offsets(other)
    epoch = sorted(first[n].case_index for n in range(3))  # every case once per epoch
    assert epoch == [0, 1, 2]


def test_loader_workers_give_the_same_stream_and_resume(phantom_cases):
    dataset = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, seed=2, cache_bytes=10**7)
    single = list(make_patch_loader(dataset, 2, num_workers=0, num_samples=6))
    workers = list(make_patch_loader(dataset, 2, num_workers=2, num_samples=6, pin_memory=False))
    resumed = list(make_patch_loader(dataset, 2, num_workers=0, start=4, num_samples=2))
    for a, b in zip(single, workers):
        assert torch.equal(a.input, b.input) and torch.equal(a.mask, b.mask) and torch.equal(a.offset, b.offset)
    assert single[0].input.shape == (2, 8, 8, 8, 8)
    assert torch.equal(resumed[0].input, single[2].input)  # samples 4 and 5
    assert dataset.cache.n_ready == 3  # the workers filled the shared cache for everyone


def test_cache_gives_the_uncached_samples(phantom_cases):
    cached = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=10**7)
    budget = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=2 * (4 * 4 + 1) * 24 ** 3)
    plain = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=0)
    assert cached.preload() == 3 and budget.preload() == 2 and plain.cache is None
    for n in range(6):
        assert torch.equal(cached[n].input, plain[n].input) and torch.equal(budget[n].mask, plain[n].mask)
    image, label = cached.volume(1)
    assert image.is_shared() and torch.equal(image, plain.volume(1)[0]) and torch.equal(label, plain.volume(1)[1])


def test_cache_budget_respects_shared_memory(phantom_cases, monkeypatch):
    from patchddm_fast.data import loader
    per_case = (4 * 4 + 1) * 24 ** 3
    monkeypatch.setattr(loader, "shared_memory_free", lambda: int(2.5 * per_case / 0.9))
    assert PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=10**9).cache.capacity == 2
    assert PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=per_case).cache.capacity == 1
    monkeypatch.setattr(loader, "shared_memory_free", lambda: 0)
    assert PatchDataset(phantom_cases, patch_shape=8, volume_shape=24).cache is None


def test_unreadable_case_is_reported_and_skipped(phantom_cases):
    bad = phantom_cases[1].files["t2"]
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes()))[:-100])
    dataset = PatchDataset(phantom_cases, patch_shape=8, volume_shape=24, cache_bytes=10**7)
    assert dataset.preload() == 2
    indices = {dataset[n].case_index for n in range(9)}
    assert indices == {0, 2}
    assert dataset.report.failed_cases == [phantom_cases[1].case_id]
    assert "cannot read" in dataset.report.format()


def test_bad_sizes():
    from patchddm_fast.data import CaseFiles, DataError
    case = CaseFiles("x", None, 1, {})
    with pytest.raises(ValueError, match="does not fit"):
        PatchDataset([case], patch_shape=32, volume_shape=16, cache_bytes=0)
    with pytest.raises(ValueError, match="patch_shape"):
        PatchDataset([case], patch_shape=(8, 8), volume_shape=16, cache_bytes=0)
    with pytest.raises(DataError, match="no cases"):
        PatchDataset([], cache_bytes=0)
