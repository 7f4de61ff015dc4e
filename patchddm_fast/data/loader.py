"""The patch Dataset, its shared in-RAM cache of preprocessed volumes, and the DataLoader.

Decoding a BraTS case (four gzipped NIfTI files, percentiles, padding) takes about a second;
cropping a patch from a decoded volume takes milliseconds. So the dataset keeps preprocessed,
padded volumes in one shared-memory arena: as many cases as fit in `cache_bytes` (the first
ones of its case list; those beyond are decoded on every visit, never evicting others, so a
dataset larger than the budget does not thrash). Whichever process first needs a cached case
(the main process in preload(), or any loader worker) decodes it into the arena, and every
process reads it from there: one copy in RAM however many workers there are.

A case that turns out unreadable (a corrupted or truncated file, a header claiming an absurd
grid, ...) or whose grid is larger than the volume grid (it would have to be cropped) is
reported in `dataset.report` (and logged) and its samples go to the next case of the epoch's
order, so one bad file never stops a run.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._meminfo import available_memory
from ..ops import assemble_input
from .layout import SEQUENCES, CaseError, CaseFiles, DataError, DatasetReport
from .nifti import load_case
from .patches import PatchSample, StreamSampler, epoch_order, sample_offset, sample_rng
from .preprocess import DEFAULT_PERCENTILES, PAPER_VOLUME, as_shape, prepare_raw

logger = logging.getLogger("patchddm_fast")

PAPER_PATCH = (128, 128, 128)


def shared_memory_free() -> int | None:
    """Free bytes of /dev/shm, which backs PyTorch's shared memory on Linux (containers often
    give it only 64 MiB, and writing past it kills the process with SIGBUS); None elsewhere."""
    try:
        stats = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def cache_budget(cache_bytes: int | str) -> int:
    """The cache's byte budget: "auto" = half the available RAM; never more than 90% of the
    free shared memory (with a warning when an explicit budget is cut)."""
    budget = available_memory() // 2 if cache_bytes == "auto" else int(cache_bytes)
    shm = shared_memory_free()
    if shm is not None and budget > 0.9 * shm:
        if cache_bytes != "auto":
            logger.warning("patchddm_fast: the volume cache gets %.1f GiB instead of %.1f GiB: /dev/shm has only "
                           "%.1f GiB free (raise it, e.g. docker run --shm-size)", 0.9 * shm / 2**30,
                           budget / 2**30, shm / 2**30)
        budget = int(0.9 * shm)
    return max(0, budget)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory. Allocates the shared storage directly:
    share_memory_() on an ordinary tensor would copy it, which takes seconds per GiB."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # a torch without it: the copying route
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(new_shared(nbytes)).view(shape)


class VolumeCache:
    """Slots of preprocessed volumes in shared memory, each filled once by whichever process
    claims it first. States live in shared memory too; the lock guards only state changes
    (never a decode), so processes never wait on each other's decoding."""

    EMPTY, FILLING, READY = 0, 1, 2

    def __init__(self, capacity: int, image_shape: tuple[int, ...], label_shape: tuple[int, ...] | None):
        self.capacity = capacity
        self.images = _shared_empty((capacity,) + image_shape, torch.float32)
        self.labels = _shared_empty((capacity,) + label_shape, torch.uint8) if label_shape is not None else None
        self.state = torch.zeros(capacity, dtype=torch.uint8).share_memory_()
        self.lock = multiprocessing.Lock()

    @staticmethod
    def bytes_per_case(image_shape, label_shape) -> int:
        return 4 * math.prod(image_shape) + (math.prod(label_shape) if label_shape is not None else 0)

    def claim(self, slot: int) -> int:
        """READY: read the slot; EMPTY: it is now yours to fill (then publish or release);
        FILLING: another process is filling it, do not wait."""
        with self.lock:
            state = int(self.state[slot])
            if state == self.EMPTY:
                self.state[slot] = self.FILLING
            return state

    def publish(self, slot: int) -> None:
        with self.lock:
            self.state[slot] = self.READY

    def release(self, slot: int) -> None:
        with self.lock:
            self.state[slot] = self.EMPTY

    def entry(self, slot: int):
        return self.images[slot], (self.labels[slot] if self.labels is not None else None)

    @property
    def n_ready(self) -> int:
        return int((self.state == self.READY).sum())


class PatchDataset(torch.utils.data.Dataset):
    """Random centre-biased patches of preprocessed BraTS cases, as PatchDDM's model input.

    Item n is sample number n (any n >= 0; see patches.py): a PatchSample whose input is
    written by patchddm_fast.ops.assemble_input in one pass from the padded volume.

    cases: the cases to draw from (find_cases / split_cases);
    patch_shape, volume_shape: int or 3 ints (defaults: the paper's 128^3 of 256^3);
    cache_bytes: RAM budget of the shared volume cache; "auto" = half the available RAM; 0 = off
        (either way at most 90% of the free /dev/shm);
    with_label: read segmentations (training; without, masks are zero); x_t_channels: zero
        channels left for x_t.

    `report` holds the problems met in this process; loader workers log theirs. preload()
    (or one pass over the cases) finds unreadable cases up front.
    """

    def __init__(self, cases: Sequence[CaseFiles], *, patch_shape=PAPER_PATCH, volume_shape=PAPER_VOLUME,
                 seed: int = 0, cache_bytes: int | str = "auto", with_label: bool = True,
                 percentiles=DEFAULT_PERCENTILES, x_t_channels: int = 1):
        if not cases:
            raise DataError("PatchDataset: no cases to draw patches from")
        self.cases = list(cases)
        self.patch_shape = as_shape(patch_shape, "patch_shape")
        self.volume_shape = as_shape(volume_shape, "volume_shape")
        sample_offset(np.random.default_rng(0), self.volume_shape, self.patch_shape)  # checks the fit
        self.seed, self.with_label, self.percentiles = int(seed), with_label, tuple(percentiles)
        self.x_t_channels = int(x_t_channels)
        self.channels = len(SEQUENCES) + 3 + self.x_t_channels
        self.report = DatasetReport(n_found=len(self.cases))
        self._bad: set[int] = set()
        self._order = (-1, None)
        image_shape = (len(SEQUENCES),) + self.volume_shape
        label_shape = self.volume_shape if with_label else None
        per_case = VolumeCache.bytes_per_case(image_shape, label_shape)
        capacity = min(len(self.cases), cache_budget(cache_bytes) // per_case)
        self.cache = VolumeCache(capacity, image_shape, label_shape) if capacity > 0 else None

    def __len__(self) -> int:
        """One epoch: every case once."""
        return len(self.cases)

    # -- volumes -------------------------------------------------------------------------------
    def _prepare(self, index: int, image_out=None, label_out=None):
        case = self.cases[index]
        try:
            raw = load_case(case, with_label=self.with_label, max_shape=self.volume_shape)
            prepared = prepare_raw(raw, self.volume_shape, percentiles=self.percentiles, image_out=image_out,
                                   label_out=label_out)
        except CaseError as error:
            self._bad.add(index)
            self.report.add_error(error)
            logger.warning("patchddm_fast: skipping %s", error)
            raise
        for note in prepared.warnings:
            self.report.add(case.case_id, "warning", note)
        return prepared.image, prepared.label

    def volume(self, index: int):
        """(image (4, *volume_shape) float32 in [-1, 1], label (*volume_shape) uint8 or None) of
        case `index`, from the cache when it is there. Do not modify them (they may be the
        cache's). Raises CaseError for an unreadable case."""
        if index in self._bad:
            raise CaseError(self.cases[index].case_id, "unreadable (reported before)")
        cache = self.cache
        if cache is not None and index < cache.capacity:
            state = cache.claim(index)
            if state == VolumeCache.READY:
                return cache.entry(index)
            if state == VolumeCache.EMPTY:
                image, label = cache.entry(index)
                try:
                    self._prepare(index, image, label)
                except BaseException:
                    cache.release(index)
                    raise
                cache.publish(index)
                return image, label
        return self._prepare(index)

    def preload(self, threads: int | None = None, progress: bool = False) -> int:
        """Decodes every case that fits in the cache, in `threads` threads (decompression and
        numpy release the GIL); returns the number of cached cases. Unreadable cases are
        reported, not raised."""
        if self.cache is None:
            return 0
        threads = threads or min(4, os.cpu_count() or 1)

        def fill(index):
            try:
                self.volume(index)
            except CaseError:
                pass

        indices = range(self.cache.capacity)
        with ThreadPoolExecutor(threads) as pool:
            done = pool.map(fill, indices)
            if progress:
                from tqdm import tqdm
                done = tqdm(done, total=len(indices), desc="caching volumes", unit="case")
            for _ in done:
                pass
        return self.cache.n_ready

    # -- samples -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.cases)))
        return self._order[1]

    def __getitem__(self, number) -> PatchSample:
        number = int(number)
        if number < 0:
            raise IndexError(f"PatchDataset: sample numbers start at 0, got {number}")
        epoch, position = divmod(number, len(self.cases))
        order = self._epoch_order(epoch)
        for attempt in range(len(self.cases)):
            index = int(order[(position + attempt) % len(self.cases)])
            try:
                image, label = self.volume(index)
                break
            except CaseError:
                continue
        else:
            raise DataError("no case could be read:\n" + self.report.format())
        offset = sample_offset(sample_rng(self.seed, number), self.volume_shape, self.patch_shape)
        return self.patch(image, label, offset, index)

    def patch(self, image, label, offset, index: int = -1) -> PatchSample:
        """The PatchSample at `offset` of a padded volume."""
        p = self.patch_shape
        model_input = torch.empty((1, self.channels) + p, dtype=torch.float32)
        model_input[0, len(SEQUENCES) + 3:].zero_()
        assemble_input(image, offset, patch_shape=p, out=model_input)
        if label is not None:
            crop = label[offset[0]:offset[0] + p[0], offset[1]:offset[1] + p[1], offset[2]:offset[2] + p[2]]
            mask = (crop > 0).to(torch.float32).unsqueeze(0)
        else:
            mask = torch.zeros((1,) + p, dtype=torch.float32)
        return PatchSample(model_input[0], mask, torch.tensor(offset, dtype=torch.int64), index)


def make_patch_loader(dataset: PatchDataset, batch_size: int, *, num_workers: int = 2, start: int = 0,
                      rank: int = 0, world_size: int = 1, num_samples: int | None = None,
                      pin_memory: bool | None = None, prefetch_factor: int = 2,
                      preload: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of batched PatchSamples: sample numbers start + rank, start + rank +
    world_size, ... (endless unless num_samples per process), `num_workers` persistent workers,
    pinned memory when CUDA is available. Workers' global RNGs are seeded from the dataset's
    seed (torch, numpy and random), not from the caller's RNG state. preload: fill the cache
    first, in this process."""
    if preload:
        dataset.preload()
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    sampler = StreamSampler(start, rank=rank, world_size=world_size, num_samples=num_samples)
    # Reduced into torch's int64 seed range: unchanged for every seed below 2^63 / 1_000_003, and
    # seeds up to 2^63 - 1 (what `patchddm train --seed` accepts) no longer overflow.
    generator = torch.Generator().manual_seed((dataset.seed * 1_000_003 + rank) % 2**63)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin,
        persistent_workers=num_workers > 0, prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=generator)
