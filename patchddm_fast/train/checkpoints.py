"""Training checkpoints: everything a run needs to continue exactly, and a trained model's loader.

A training checkpoint is a patchddm_fast.nn checkpoint (config + weights, written atomically by
nn.save_checkpoint: a temporary file, then os.replace) whose `extra` holds

    kind "patchddm_fast.train", version 1
    step, samples_done          optimizer steps done; samples consumed by the whole job (the
                                data loader's position: the next sample number)
    train_config                the TrainConfig as plain data
    optimizer, scaler, ema      their state_dicts (scaler / ema None when unused)
    rng                         the torch (CPU and CUDA), numpy and python generators' states
    schedule                    the noise schedule's settings
    shapes                      training patch and volume shapes, image channels
    world_size, last_loss, precision

so patchddm_fast.nn.load_checkpoint reads the weights too. load_trained_model gives a ready
network (the EMA weights by default) and what a sampler needs to know about its training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..diffusion import NoiseSchedule
from ..nn import CheckpointMismatchError, UNet3D, load_checkpoint, save_checkpoint
from ..nn.checkpoints import check_state_dict

KIND = "patchddm_fast.train"
VERSION = 1
LAST = "last.pt"

# PatchDDM's schedule (guided-diffusion's linear betas); recorded in every checkpoint.
SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def make_schedule(settings: Mapping | None = None) -> NoiseSchedule:
    """The NoiseSchedule of a checkpoint's settings (None: PatchDDM's linear schedule)."""
    s = dict(SCHEDULE if settings is None else settings)
    if s.get("name") == "linear":
        return NoiseSchedule.linear(int(s["num_timesteps"]), float(s["beta_start"]), float(s["beta_end"]))
    if s.get("name") == "cosine":
        return NoiseSchedule.cosine(int(s["num_timesteps"]))
    raise ValueError(f"unknown noise schedule settings {s}")


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


def load_trained_model(path, *, ema: bool = True, map_location="cpu", **options) -> tuple[UNet3D, dict]:
    """(network in eval mode, info) from a checkpoint written by the trainer (or any
    patchddm_fast network checkpoint, e.g. an imported original one).

    ema: use the EMA weights when the checkpoint has them (else the trained weights).
    options: UNet3D options (fused, checkpoint, channels_last).
    info: "schedule" (settings for make_schedule), "volume_shape" and "patch_shape" (3-tuples,
    None when unknown), "image_channels", "step", "ema" (whether the EMA weights were loaded),
    "precision" (of training), "train_config" (dict or None), "last_loss", "path".
    Raises FileNotFoundError, or CheckpointMismatchError for a file that is not one of ours.
    """
    model, extra = _load(path, map_location)
    if options:
        rebuilt = UNet3D(model.config, **options)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.to(next(model.parameters()).device)
    trained = extra.get("kind") == KIND
    shapes = extra.get("shapes", {}) if trained else {}
    use_ema = bool(ema and trained and extra.get("ema"))
    if use_ema:
        weights = extra["ema"]["weights"]
        check_state_dict(model, weights, f"{path} (EMA weights)")
        model.load_state_dict(weights)
    info = {
        "path": str(path),
        "schedule": dict(extra.get("schedule", SCHEDULE)),
        # What the network predicts; checkpoints without the entry (imported original ones,
        # ours from before it) predict the noise.
        "prediction_type": extra.get("prediction_type", "epsilon"),
        "volume_shape": tuple(shapes["volume"]) if shapes.get("volume") else None,
        "patch_shape": tuple(shapes["patch"]) if shapes.get("patch") else None,
        "image_channels": int(shapes.get("image_channels", model.config.in_channels - 4)),
        "step": int(extra.get("step", 0)) if trained else None,
        "ema": use_ema,
        "precision": extra.get("precision") if trained else None,
        "train_config": extra.get("train_config") if trained else None,
        "last_loss": extra.get("last_loss") if trained else None,
    }
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
