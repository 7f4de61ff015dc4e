"""What a checkpoint records about how its network was trained, in one format.

The trainer and `patchddm import-checkpoint` both write CheckpointInfo.to_dict() into the
`extra` of a patchddm_fast.nn checkpoint; everything that reads a checkpoint (sampling,
validation, resuming) reads it back with CheckpointInfo.from_dict. Sampling needs the noise
schedule and the volume grid the coordinates were normalised over; the rest describes the run.

Checkpoints of earlier versions of the trainer kept the shapes under extra["shapes"]
({"patch", "volume", "image_channels"}); from_dict reads those too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .diffusion.schedule import NoiseSchedule
from .diffusion.schedulers import PREDICTION_TYPES
from .nn.checkpoints import CheckpointMismatchError

# The fields to_dict writes; `path` and `ema_weights` describe a loaded copy, not the file.
_RECORDED = ("schedule", "prediction_type", "volume_shape", "patch_shape", "image_channels", "source", "step",
             "precision", "last_loss", "train_config")


@dataclass(frozen=True)
class CheckpointInfo:
    """schedule: the training noise schedule (PatchDDM's linear one when not recorded).
    prediction_type: what the network predicts, "epsilon" (the noise; the original PatchDDM,
    and every checkpoint that does not record it), "sample" (x0) or "v_prediction".
    volume_shape / patch_shape: the padded training volume (the coordinates' frame) and the
    patch size, 3-tuples or None when unknown. image_channels: MR channels of the input.
    source: the original checkpoint an imported one came from. step, precision, last_loss,
    train_config: the training run's (None for imported checkpoints).
    path, ema_weights: where the checkpoint was loaded from and whether the loaded weights are
    its EMA weights (set by the loader, not stored)."""

    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.linear, compare=False)
    prediction_type: str = "epsilon"
    volume_shape: tuple[int, int, int] | None = None
    patch_shape: tuple[int, int, int] | None = None
    image_channels: int | None = None
    source: str | None = None
    step: int | None = None
    precision: str | None = None
    last_loss: float | None = None
    train_config: dict | None = None
    path: str | None = None
    ema_weights: bool = False

    def to_dict(self) -> dict:
        """Plain data for a checkpoint's `extra` (shapes as lists, the schedule as its settings)."""
        data = {name: getattr(self, name) for name in _RECORDED}
        data["schedule"] = self.schedule.to_dict()
        for name in ("volume_shape", "patch_shape"):
            data[name] = list(data[name]) if data[name] is not None else None
        return data

    @classmethod
    def from_dict(cls, extra: Mapping, *, in_channels: int | None = None, **loaded) -> "CheckpointInfo":
        """The info in a checkpoint's `extra` (other entries are ignored). in_channels: the
        network's, for checkpoints that do not record image_channels (the image is the input
        less 3 coordinate channels and x_t). loaded: path, ema_weights. Raises
        CheckpointMismatchError for a schedule or shape that cannot be used."""
        old = extra.get("shapes") or {}  # the trainer's format before this one
        values = {name: extra.get(name) for name in _RECORDED}
        values["volume_shape"] = _shape(extra.get("volume_shape", old.get("volume")), "volume_shape")
        values["patch_shape"] = _shape(extra.get("patch_shape", old.get("patch")), "patch_shape")
        channels = extra.get("image_channels", old.get("image_channels"))
        if channels is None and in_channels is not None:
            channels = in_channels - 4
        values["image_channels"] = int(channels) if channels is not None else None
        values["schedule"] = _schedule(extra.get("schedule"))
        values["prediction_type"] = values["prediction_type"] or "epsilon"
        if values["prediction_type"] not in PREDICTION_TYPES:
            raise CheckpointMismatchError(f"the checkpoint's prediction_type {values['prediction_type']!r} is not "
                                          f"one of {PREDICTION_TYPES}")
        if values["step"] is not None:
            values["step"] = int(values["step"])
        return cls(**values, **loaded)

    def replace(self, **changes) -> "CheckpointInfo":
        return dataclasses.replace(self, **changes)


def _schedule(recorded) -> NoiseSchedule:
    """A recorded schedule: its settings (NoiseSchedule.to_dict), a name, or None (PatchDDM's)."""
    if isinstance(recorded, NoiseSchedule):
        return recorded
    settings = dict(recorded) if isinstance(recorded, Mapping) else {"name": recorded or "linear"}
    try:
        return NoiseSchedule.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise CheckpointMismatchError(f"the checkpoint's noise schedule {recorded!r} is not usable: {error}") from None


def _shape(value, name: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        values = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise CheckpointMismatchError(f"the checkpoint's {name} {value!r} is not three positive sizes")
    return values


__all__ = ["CheckpointInfo"]
