"""How much memory one sampling forward pass needs, and how much the device has free.

The peak of a forward pass is measured, on any device, by counting the bytes of the tensors
that are alive while it runs (a TorchDispatchMode sees every tensor an op creates; a weak
reference tells when it dies). A U-Net's activations are proportional to the number of
voxels, so a pass on a small probe volume, scaled by the voxel ratio, predicts the pass on
the full volume without running it. Buffers that a library allocates inside an op and frees
before returning (cuDNN / oneDNN workspaces) are not seen; callers keep a safety margin.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .._meminfo import available_memory


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created inside the mode: `current` and `peak`.

    Storages of `external` tensors (weights, inputs) and in-place results on them are not
    counted: they exist before and after the work.
    fake_tensors: key storages by identity instead of by address, so that fake and meta
    tensors (whose address is 0) are counted like real ones (benchmarks count a pass on
    FakeTensorMode's shapes). Real tensors give the same counts either way.
    """

    def __init__(self, external=(), *, fake_tensors: bool = False):
        super().__init__()
        self.fake_tensors = fake_tensors
        self.external = {self._key(t.untyped_storage()) for t in external if isinstance(t, torch.Tensor)}
        self.refs: dict[int, int] = {}      # storage pointer -> number of live tensors on it
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _key(self, storage) -> int:
        return storage._cdata if self.fake_tensors else storage.data_ptr()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = self._key(storage)
        if key in self.external or key == 0:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = storage.nbytes()
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)


def forward_peak_bytes(run, external=()) -> int:
    """Peak bytes of the tensors created while run() executes (run's result included)."""
    with LiveTensorBytes(external) as tracker:
        result = run()
    del result
    return tracker.peak


def probe_shape(shape, multiple: int) -> tuple[int, ...]:
    """A smaller spatial shape for measuring: each axis about a quarter, a multiple of `multiple`."""
    return tuple(min(n, max(multiple, multiple * math.ceil(n / 4 / multiple))) for n in shape)


def device_free_bytes(device: torch.device, budget: int | None = None) -> int:
    """Bytes available for sampling: `budget` if given; else on CUDA the driver's free memory
    plus what PyTorch's caching allocator holds unused; on the CPU the available RAM."""
    if budget is not None:
        return int(budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_memory()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
