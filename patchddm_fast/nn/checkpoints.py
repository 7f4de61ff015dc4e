"""Checkpoints: importing the original PatchDDM's, and our own (config stored with the weights).

Original checkpoints are plain state_dicts (guided-diffusion's train_util saves
model.state_dict()); DDP adds a "module." prefix, torch.compile "_orig_mod.", and some
scripts wrap the dict ({"state_dict": ...}). Their architecture is read off the tensor
shapes; the GroupNorm group count is not visible in any shape, so it defaults to
model_channels (as in the paper) and can be given.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np
import torch

from .._files import umask_mode
from .config import UNetConfig
from .unet import UNet3D

FORMAT = "patchddm_fast.UNet3D"
FORMAT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 20  # names shown per category in an error message


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the network: names what is missing, unexpected or mis-shaped."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


# -- reading ------------------------------------------------------------------------------

def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and obj and all(
        isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray)) for k, v in obj.items())


def _unwrap(obj, origin: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if _is_tensor_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        what = f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointMismatchError(f"{origin}: holds no state_dict (a dict of name -> tensor); found {what}")
    else:
        raise CheckpointMismatchError(f"{origin}: holds no state_dict within three levels of nesting")
    state = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The state_dict in `source`: a mapping, a .pt/.pth file (torch.save) or a .npz file
    (keys "state_dict/<name>" as in the golden data, or plain names)."""
    if isinstance(source, Mapping):
        return _unwrap(source, "the given mapping")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".npz"):
        if not zipfile.is_zipfile(path):
            raise CheckpointMismatchError(f"{path}: is not a .npz file (not a zip archive of arrays)")
        try:  # arrays only (allow_pickle=False): a .npz of objects is refused, never unpickled
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise ValueError("it holds a single array, not named arrays")
                names = [k for k in data.files if k.startswith("state_dict/")]
                if names:
                    arrays = {k[len("state_dict/"):]: data[k] for k in names}
                else:
                    arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise CheckpointMismatchError(f"{path}: cannot be read as a .npz of arrays ({exc})") from exc
        return _unwrap(arrays, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(f"{path}: cannot be read as a torch checkpoint of tensors "
                                      f"(torch.load with weights_only=True): {exc}") from exc
    return _unwrap(obj, path)


# -- the original's architecture from tensor shapes ---------------------------------------

def _shape(state, key, origin):
    if key not in state:
        raise CheckpointMismatchError(f"{origin}: cannot infer the architecture: missing key {key!r}",
                                      missing=[key])
    return tuple(state[key].shape)


def infer_config(state: Mapping[str, torch.Tensor], groups: int | None = None, dropout: float = 0.0,
                 origin: str = "checkpoint") -> UNetConfig:
    """The UNetConfig of an original PatchDDM state_dict, read off its tensor shapes."""
    model_channels = _shape(state, "time_embed.0.weight", origin)[1]
    conv_in = _shape(state, "input_blocks.0.0.weight", origin)
    out_channels = _shape(state, "out.2.weight", origin)[0]
    indices = {int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downsamples = sorted(i for i in indices if f"input_blocks.{i}.0.op.weight" in state)
    levels = len(downsamples) + 1
    blocks = max(indices) + 1 - 1 - len(downsamples)  # ResBlocks in the encoder
    if blocks <= 0 or blocks % levels or indices != set(range(max(indices) + 1)):
        raise CheckpointMismatchError(
            f"{origin}: cannot infer the architecture: input_blocks {sorted(indices)} with downsamplings "
            f"at {downsamples} do not form {levels} levels of equally many ResBlocks")
    num_res_blocks = blocks // levels
    channel_mult = []
    for level in range(levels):
        last = 1 + level * (num_res_blocks + 1) + num_res_blocks - 1  # the level's last ResBlock
        channels = _shape(state, f"input_blocks.{last}.0.out_layers.3.weight", origin)[0]
        if channels % model_channels:
            raise CheckpointMismatchError(f"{origin}: level {level} has {channels} channels, not a "
                                          f"multiple of model_channels={model_channels}")
        channel_mult.append(channels // model_channels)
    try:
        return UNetConfig(model_channels=model_channels, channel_mult=tuple(channel_mult),
                          num_res_blocks=num_res_blocks, in_channels=conv_in[1], out_channels=out_channels,
                          groups=groups, dropout=dropout)
    except ValueError as exc:
        raise CheckpointMismatchError(f"{origin}: the inferred architecture is invalid: {exc}") from exc


def _listing(label: str, items: list[str]) -> str:
    shown = "; ".join(items[:_LISTED])
    more = f" (and {len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return f"\n  {label} ({len(items)}): {shown}{more}"


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: str = "checkpoint") -> None:
    """Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
                        for k in expected if k in state and tuple(state[k].shape) != expected[k])
    not_float = sorted(f"{k}: {state[k].dtype}" for k in expected if k in state and not state[k].is_floating_point())
    if missing or unexpected or mismatched or not_float:
        message = f"{origin} does not fit the network {model.config}:"
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", mismatched), ("not floating point", not_float)):
            if items:
                message += _listing(label, items)
        raise CheckpointMismatchError(message, missing, unexpected, mismatched)


def load_original_checkpoint(source, *, groups: int | None = None, **options) -> UNet3D:
    """A ready UNet3D (eval mode) holding the weights of an original PatchDDM checkpoint.

    source: a path (.pt/.pth from torch.save, or .npz) or a state_dict mapping.
    groups: GroupNorm groups (not visible in the shapes; default model_channels, the paper's).
    options: UNet3D options (fused, checkpoint, channels_last).
    Raises CheckpointMismatchError naming the keys that do not fit.
    """
    origin = "the given state_dict" if isinstance(source, Mapping) else os.fspath(source)
    state = read_state_dict(source)
    model = UNet3D(infer_config(state, groups=groups, origin=origin), **options)
    check_state_dict(model, state, origin)
    model.load_state_dict(state)
    return model.eval()


# -- our own format -------------------------------------------------------------------------

def save_checkpoint(model: UNet3D, path, **extra) -> None:
    """Writes the config, weights and `extra` (plain data: numbers, strings, tensors, dicts
    and lists of them, e.g. an optimizer state_dict) to `path`, atomically (a temporary file in
    the same directory, then os.replace: a crash never leaves a half-written checkpoint)."""
    path = os.fspath(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
               "state_dict": model.state_dict(), "extra": extra}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; the user's umask decides, as for any file
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno is not None:  # a full disk, a read-only folder
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


def load_checkpoint(path, *, map_location="cpu", **options) -> tuple[UNet3D, dict]:
    """(model in eval mode, extra) from a file written by save_checkpoint.

    options: UNet3D options (fused, checkpoint, channels_last); the architecture comes from
    the file. An original PatchDDM checkpoint is refused with a pointer to
    load_original_checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(f"{path}: cannot be read as a patchddm_fast checkpoint: {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: not a {FORMAT} checkpoint (no 'format' entry); for a "
                                      f"checkpoint of the original PatchDDM use load_original_checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: format version {payload.get('version')} is not the "
                                      f"supported {FORMAT_VERSION}")
    model = UNet3D(UNetConfig.from_dict(payload["config"]), **options)
    check_state_dict(model, payload["state_dict"], path)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload.get("extra", {})
