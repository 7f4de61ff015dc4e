"""Training checkpoints: everything a run needs to continue exactly, and a trained model's loader.

A training checkpoint is a patchddm_fast.nn checkpoint (config + weights, written atomically by
nn.save_checkpoint: a temporary file, then os.replace) whose `extra` holds

    kind "patchddm_fast.train", version 1
    step, samples_done          optimizer steps done; samples consumed by the whole job (the
                                data loader's position: the next sample number)
    train_config                the TrainConfig as plain data
    optimizer, scaler, ema      their state_dicts (scaler / ema None when unused)
    rng                         the torch (CPU and CUDA), numpy and python generators' states
    world_size, elapsed
    and the entries of patchddm_fast.CheckpointInfo.to_dict(): schedule, volume_shape,
    patch_shape, image_channels, step, precision, last_loss, train_config

so patchddm_fast.nn.load_checkpoint reads the weights too. load_trained_model gives a ready
network (the EMA weights by default) and its CheckpointInfo, for trained and imported
checkpoints alike.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoint_info import CheckpointInfo
from ..nn import CheckpointMismatchError, UNet3D, load_checkpoint, save_checkpoint
from ..nn.checkpoints import check_state_dict

KIND = "patchddm_fast.train"
VERSION = 1
LAST = "last.pt"


def step_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}.pt"


# -- random generators --------------------------------------------------------------------------

def rng_states() -> dict:
    """The global generators' states as tensors and plain data (torch.load weights_only can read)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }


def restore_rng_states(states: Mapping) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# -- writing and reading -------------------------------------------------------------------------

def save_training_checkpoint(path, model: UNet3D, **state) -> Path:
    """Writes a training checkpoint atomically (see the module docstring for `state`)."""
    save_checkpoint(model, path, kind=KIND, version=VERSION, **state)
    return Path(path)


def read_training_checkpoint(path, map_location="cpu") -> tuple[UNet3D, dict]:
    """(model, extra) of a training checkpoint; CheckpointMismatchError for any other file."""
    model, extra = _load(path, map_location)
    if extra.get("kind") != KIND:
        raise CheckpointMismatchError(f"{path}: a network checkpoint without training state (no optimizer, "
                                      "step or data position), so a run cannot continue from it")
    if extra.get("version") != VERSION:
        raise CheckpointMismatchError(f"{path}: training checkpoint version {extra.get('version')}, this "
                                      f"version of patchddm_fast reads version {VERSION}")
    return model, extra


def _load(path, map_location):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return load_checkpoint(path, map_location=map_location)


def load_trained_model(path, *, ema: bool = True, map_location="cpu", **options) -> tuple[UNet3D, CheckpointInfo]:
    """(network in eval mode, its CheckpointInfo) from a checkpoint written by the trainer (or
    any patchddm_fast network checkpoint, e.g. one written by `patchddm import-checkpoint`).

    ema: use the EMA weights when the checkpoint has them (else the trained weights); the
    info's ema_weights says which were loaded. options: UNet3D options (fused, checkpoint,
    channels_last). Raises FileNotFoundError, or CheckpointMismatchError for a file that is
    not one of ours or whose recorded schedule or shapes cannot be used.
    """
    model, extra = _load(path, map_location)
    if options:
        rebuilt = UNet3D(model.config, **options)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.to(next(model.parameters()).device)
    use_ema = bool(ema and extra.get("kind") == KIND and extra.get("ema"))
    if use_ema:
        weights = extra["ema"]["weights"]
        check_state_dict(model, weights, f"{path} (EMA weights)")
        model.load_state_dict(weights)
    try:
        info = CheckpointInfo.from_dict(extra, in_channels=model.config.in_channels, path=str(path),
                                        ema_weights=use_ema)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path}: {error}") from None
    return model.eval(), info


def checkpoint_exists(out_dir) -> bool:
    return (Path(out_dir) / LAST).is_file()


def remove_stale_temporaries(out_dir) -> None:
    """Deletes temporary files a killed save left behind (last.pt.<random>.tmp); never a checkpoint."""
    for path in Path(out_dir).glob("*.pt.*.tmp"):
        try:
            os.unlink(path)
        except OSError:
            pass
