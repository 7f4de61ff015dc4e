"""A checkpoint loaded for sampling: the network in eval mode on its device, and what sampling
needs to know about its training (patchddm_fast.CheckpointInfo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_info import CheckpointInfo
from ..data import DataError
from ..fast_settings import fast_settings
from ..diffusion import NoiseSchedule
from ..nn import CheckpointMismatchError, read_state_dict

IMAGE_CHANNELS = 4  # t1, t1ce, t2, flair
MODEL_IN_CHANNELS = IMAGE_CHANNELS + 3 + 1  # + coordinates + x_t


@dataclass
class LoadedModel:
    """A network ready to sample, with its checkpoint's info."""
    model: torch.nn.Module
    info: CheckpointInfo
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def volume_shape(self) -> tuple[int, int, int] | None:
        """The padded training volume (None: not recorded)."""
        return self.info.volume_shape

    @property
    def patch_shape(self) -> tuple[int, int, int] | None:
        return self.info.patch_shape

    @property
    def schedule(self) -> NoiseSchedule:
        return self.info.schedule


def _is_plain_state_dict(path: Path) -> bool:
    """Whether the file is a bare (possibly wrapped) state_dict rather than our format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "format" in payload:
            return False
        read_state_dict(payload)
    except Exception:  # neither: the original error stands
        return False
    return True


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = True,
               channels_last: bool | None = None) -> LoadedModel:
    """Loads a checkpoint written by `patchddm train` (or by patchddm_fast.nn.save_checkpoint,
    or converted by `patchddm import-checkpoint`) for sampling, in eval mode on `device`.
    channels_last: run the convolutions in channels_last_3d (the same values to float32
    rounding); None: where it is faster on this device (patchddm_fast.fast_settings).

    Raises DataError when the file is missing, CheckpointMismatchError when it is not a
    checkpoint of a PatchDDM segmentation network (naming what does not fit)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not a checkpoint file")
    from ..train import load_trained_model

    device = torch.device(device)
    if channels_last is None:
        channels_last = fast_settings(device).channels_last
    try:
        model, info = load_trained_model(path, ema=ema, map_location="cpu", channels_last=channels_last)
    except CheckpointMismatchError as error:
        if _is_plain_state_dict(path):
            raise CheckpointMismatchError(
                f"{path}: holds a bare state_dict (like the original PatchDDM's checkpoints), not a patchddm_fast "
                f"checkpoint; convert it first with `patchddm import-checkpoint {path.name} converted.pt`") from None
        raise error from None
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointMismatchError(f"{path}: cannot be loaded as a patchddm_fast checkpoint "
                                      f"({type(error).__name__}: {error})") from None
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    out_channels = getattr(config, "out_channels", None)
    if in_channels != MODEL_IN_CHANNELS or out_channels != 1:
        raise CheckpointMismatchError(
            f"{path}: the network takes {in_channels} input and gives {out_channels} output channels; PatchDDM "
            f"segmentation needs {MODEL_IN_CHANNELS} in (4 MR sequences, 3 coordinates, x_t) and 1 out")
    return LoadedModel(model.to(device).eval(), info, path)
