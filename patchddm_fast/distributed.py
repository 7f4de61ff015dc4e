"""Running under torchrun, and the single-process case, behind one interface: data-parallel
training (patchddm_fast.train) and sampling a folder split across processes
(patchddm_fast.inference.sample_folder).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; when they are
there (and WORLD_SIZE > 1) the process group is initialised (NCCL on CUDA, gloo on the CPU),
each process on its LOCAL_RANK's GPU when there is one. Without them, nothing changes.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .device import resolve_device

# Validation runs on rank 0 while the others wait at a barrier, and a sampling process that has
# finished its share of the cases waits for the others: give them time.
_TIMEOUT = datetime.timedelta(hours=2)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


class Distributed:
    """rank, world_size, device, and the few collective operations training and sampling need."""

    def __init__(self, device: str = "auto"):
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        self.world_size = world if world is not None else 1
        self.rank = rank if rank is not None else 0
        self.local_rank = _env_int("LOCAL_RANK") or 0
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} is not in [0, WORLD_SIZE={self.world_size})")
        self.device = resolve_device(device, self.local_rank)  # 'cuda' means this process's GPU
        self.enabled = self.world_size > 1
        self._owns_group = False
        if self.enabled and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=_TIMEOUT)
            self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as trained: DistributedDataParallel when data-parallel, else itself."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of the values over all processes (the values themselves alone)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag, on every process."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def owns(self, index: int) -> bool:
        """Whether item `index` of a list shared out across the processes is this one's
        (round robin: item i belongs to rank i % world_size)."""
        return index % self.world_size == self.rank

    def gather(self, value: object) -> list:
        """Every process's (picklable) value, in rank order, on every process."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
