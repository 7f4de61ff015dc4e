"""Device names as users write them ("auto", "cpu", "cuda", "cuda:N") -> a torch.device that
exists here, or a DataError saying why not. Used by sampling, the trainer and the CLI."""

from __future__ import annotations

import torch

from .data import DataError


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto': a GPU when there is one (cuda:local_rank under torchrun), else the CPU.
    'cuda' without an index is cuda:local_rank when local_rank is given."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DataError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {name}: no CUDA device is visible here (torch CUDA "
                            f"{torch.version.cuda or 'not built in'}); use --device cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DataError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise DataError(f"--device {name}: only cpu and cuda devices are supported")
    return device


__all__ = ["resolve_device"]
