"""The trainer's settings: one dataclass, checked on construction, and its command-line flags.

Fields left at None take the preset's default (PRESET_DEFAULTS) when the run starts, and
precision and channels_last left at None the device's fastest settings (fast_settings), so a
checkpoint records the values actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..diffusion.schedulers import PREDICTION_TYPES
from ..nn import PRESETS, UNetConfig
from ..nn.unet import CHECKPOINT_MODES
from ..precision import SHORT_NAMES, parse_precision, precision_argument

LR_SCHEDULES = ("constant", "cosine")

# Per preset: the patch edge, learning rate and memory option used when not given.
# The paper trains with AdamW at 1e-5 on 128^3 patches; the small preset is for short CPU runs,
# where a larger rate (with warmup and a cosine decay) gets much further in a few minutes.
# The paper's memory option goes by precision (issue 13's goal: at most 0.6x the original's
# float32 peak): in float32 "cheap" recomputation holds a step at 0.40x; in 16 bits the
# activations are half as large and no recomputation already holds it at 0.38x, 1-3% faster
# (paper preset at 64^3, benchmarks/RESULTS.md). Unresolved precision takes the float32 one.
PRESET_DEFAULTS = {
    "paper": dict(patch=128, lr=1e-5, checkpoint={"fp32": "cheap", "16-bit": "off"}),
    "small": dict(patch=32, lr=1e-3, checkpoint="off"),
}


def default_memory_option(preset: str, precision: str | None) -> str:
    """The preset's recomputation mode for a precision (None: not resolved yet, as float32)."""
    default = PRESET_DEFAULTS[preset]["checkpoint"]
    if isinstance(default, dict):
        import torch

        wide = precision is None or parse_precision(precision) == torch.float32
        return default["fp32" if wide else "16-bit"]
    return default


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    data_dir: a folder of BraTS-layout cases (patchddm_fast.data.find_cases); the split
        (patchddm_fast.data.split_cases: the paper's 295/37/37 for BraTS2020, else 10%/10%)
        gives the training cases and the validation cases.
    out_dir: where last.pt, periodic checkpoints and the logs go.
    preset: network size, "small" (CPU) or "paper" (the paper's 24M-parameter U-Net);
        width: optional override of the preset's model_channels (also its GroupNorm groups).
    patch: edge of the cubic training patches (None: 128 paper, 32 small); a multiple of the
        network's size multiple (2^(levels - 1)).
    volume: edge of the cubic padded volume the patches come from and whose coordinates they
        carry (None: from the data, see data_volume_edge); must be >= patch.
    steps: optimizer steps in total (a resumed run continues up to this number).
    batch_size: patches per step *per process* (under torchrun the global batch is
        batch_size * world size).
    lr: AdamW learning rate (None: 1e-5 paper, 1e-3 small); lr_schedule "constant" or
        "cosine" (decay to lr_min_ratio * lr at `steps`); warmup_steps: linear warmup from 0.
    weight_decay: AdamW's decoupled weight decay.
    precision: "fp32", "bf16" (autocast) or "fp16" (autocast and a gradient scaler); None
        ("auto"): bf16 where the device computes bfloat16 natively, else fp32
        (patchddm_fast.fast_settings, resolved when the run starts and recorded so).
    prediction_type: what the network learns to predict from x_t: "sample" (x0, the mask
        itself; the default, see docs/STUDY.md for why), "epsilon" (the noise, as the
        original PatchDDM) or "v_prediction". Recorded in the checkpoint for the samplers.
    checkpoint: activation checkpointing of the network, "off", "cheap" or "blocks"
        (patchddm_fast.nn.UNet3D; None: "cheap" paper, "off" small).
    channels_last: run the convolutions in the channels_last_3d memory format (faster on some
        CPUs and GPUs, notably with bf16; the weights are the same); None ("auto"): where
        fast_settings measured that it pays for the device.
    ema: decay of an exponential moving average of the weights (None: no EMA); the decay
        warms up as min(ema, (1 + n) / (10 + n)) after n updates, so short runs benefit too.
    grad_clip: maximum global gradient norm (None or 0: no clipping).
    save_every: write out_dir/last.pt every this many steps (and at the end, on Ctrl-C);
        keep_every: also keep out_dir/step_NNNNNNN.pt every this many steps (0: never).
    validate_every: every this many steps (and at the end), sample validate_cases held-out
        volumes with validate_steps DDIM steps and an ensemble of validate_ensemble, and
        report their mean Dice (0: never).
    num_workers: DataLoader worker processes per training process.
    seed: seed of the patches, timesteps, noise and the network's initialisation.
    resume: continue the run in out_dir (its last.pt) instead of starting a new one.
    device: "auto" (the GPU of this process when there is one, else the CPU), "cpu", "cuda"
        or "cuda:N".
    cache_bytes: RAM for decoded volumes ("auto": half the available memory; 0: off).
    """

    data_dir: str | Path
    out_dir: str | Path
    preset: str = "small"
    width: int | None = None
    patch: int | None = None
    volume: int | None = None
    steps: int = 1000
    batch_size: int = 2
    lr: float | None = None
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    precision: str | None = None
    prediction_type: str = "sample"
    checkpoint: str | None = None
    channels_last: bool | None = None
    ema: float | None = 0.999
    grad_clip: float | None = 1.0
    save_every: int = 500
    keep_every: int = 0
    validate_every: int = 0
    validate_cases: int = 2
    validate_steps: int = 10
    validate_ensemble: int = 3
    num_workers: int = 2
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    cache_bytes: int | str = "auto"

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid training settings:\n  " + "\n  ".join(problems))

    # -- values after the preset's defaults ------------------------------------------------
    @property
    def network(self) -> UNetConfig:
        """The network's architecture: the preset, with width overriding model_channels."""
        base = PRESETS[self.preset]
        return base if self.width is None else base.replace(model_channels=self.width, groups=self.width)

    @property
    def patch_edge(self) -> int:
        return self.patch if self.patch is not None else PRESET_DEFAULTS[self.preset]["patch"]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PRESET_DEFAULTS[self.preset]["lr"]

    @property
    def memory_option(self) -> str:
        return self.checkpoint if self.checkpoint is not None else default_memory_option(self.preset, self.precision)

    def execution(self, device) -> tuple["TrainConfig", str]:
        """(this config with precision and channels_last resolved for `device`, one line saying
        what was chosen and why). Values given explicitly are kept; None takes fast_settings."""
        import torch

        from ..fast_settings import fast_settings
        from ..nn.conv import weight_grad_kernel_chosen, winograd_chosen

        fast = fast_settings(device)
        precision = self.precision if self.precision is not None else fast.precision
        channels_last = self.channels_last if self.channels_last is not None else fast.channels_last
        auto = [name for name in ("precision", "channels_last") if getattr(self, name) is None]
        origin = f"auto for {fast.reason}: {', '.join(auto)}" if auto else "as given"
        resolved = self.replace(precision=precision, channels_last=channels_last)
        line = (f"execution: {precision}, {'channels_last_3d' if channels_last else 'contiguous'} "
                f"({origin}); recomputation {resolved.memory_option}")
        if torch.device(device).type == "cpu" and precision in ("bf16", "fp32"):
            bf16 = precision == "bf16"
            kernels = [what for what, chosen in (
                ("Winograd convolutions", winograd_chosen(torch.bfloat16 if bf16 else torch.float32)),
                ("weight gradients", bf16 and weight_grad_kernel_chosen())) if chosen]
            if kernels:
                line += f"; {'bfloat16' if bf16 else 'float32'} {' and '.join(kernels)} from patchddm's kernels where they win"
        return resolved, line

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        base = self.learning_rate
        if self.warmup_steps and step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return base
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = base * self.lr_min_ratio
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        """Plain data (paths as strings), as stored in checkpoints."""
        data = dataclasses.asdict(self)
        data["data_dir"], data["out_dir"] = str(self.data_dir), str(self.out_dir)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("prediction_type", "epsilon")  # runs from before the setting trained the noise
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problems(c: TrainConfig):
    """Every invalid value of c, each as one line naming the setting."""
    if c.preset not in PRESETS:
        yield f"preset must be one of {sorted(PRESETS)}, got {c.preset!r}"
        return  # the rest depends on the preset
    if c.width is not None and not (_is_int(c.width) and c.width > 0):
        yield f"width must be a positive int (the network's model_channels), got {c.width!r}"
    else:
        try:
            network = c.network
        except ValueError as exc:
            yield f"width {c.width}: {exc}"
            network = None
        patch = c.patch_edge
        if not (_is_int(patch) and patch > 0):
            yield f"patch must be a positive int (the edge of the cubic patches), got {c.patch!r}"
        elif network is not None and patch % network.size_multiple:
            yield (f"patch must be a multiple of {network.size_multiple} for the {c.preset} network "
                   f"({network.levels} levels, one halving per level), got {patch}")
        if c.volume is not None:
            if not (_is_int(c.volume) and c.volume > 0):
                yield f"volume must be a positive int or None (from the data), got {c.volume!r}"
            elif _is_int(patch) and c.volume < patch:
                yield f"volume ({c.volume}) must be at least the patch ({patch}): patches are cut from it"
            elif network is not None and c.volume % network.size_multiple:
                yield (f"volume must be a multiple of {network.size_multiple} so the {c.preset} network can "
                       f"run on the whole volume at sampling time, got {c.volume}")
    if c.prediction_type not in PREDICTION_TYPES:
        yield f"prediction_type must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}"
    for name in ("steps", "batch_size"):
        value = getattr(c, name)
        if not (_is_int(value) and value > 0):
            yield f"{name} must be a positive int, got {value!r}"
    for name in ("warmup_steps", "save_every", "keep_every", "validate_every", "num_workers"):
        value = getattr(c, name)
        if not (_is_int(value) and value >= 0):
            yield f"{name} must be a non-negative int, got {value!r}"
    if c.save_every == 0:
        yield "save_every must be at least 1 (last.pt is what a resumed run continues from)"
    for name in ("validate_cases", "validate_steps", "validate_ensemble"):
        value = getattr(c, name)
        if not (_is_int(value) and value > 0):
            yield f"{name} must be a positive int, got {value!r}"
    if not _is_int(c.seed) or not 0 <= c.seed <= 2**63 - 1:  # torch's and numpy's generators take 64 bits
        yield f"seed must be an int from 0 to 2^63 - 1, got {c.seed!r}"
    if c.lr is not None and not (_is_number(c.lr) and c.lr > 0):
        yield f"lr must be a positive number, got {c.lr!r}"
    if c.lr_schedule not in LR_SCHEDULES:
        yield f"lr_schedule must be one of {LR_SCHEDULES}, got {c.lr_schedule!r}"
    if not (_is_number(c.lr_min_ratio) and 0 <= c.lr_min_ratio <= 1):
        yield f"lr_min_ratio must lie in [0, 1], got {c.lr_min_ratio!r}"
    if not (_is_number(c.weight_decay) and c.weight_decay >= 0):
        yield f"weight_decay must be a non-negative number, got {c.weight_decay!r}"
    if c.precision is not None:
        try:
            parse_precision(c.precision)
        except ValueError as exc:
            yield str(exc)
    if c.checkpoint is not None and c.checkpoint not in CHECKPOINT_MODES:
        yield f"checkpoint (activation checkpointing) must be one of {CHECKPOINT_MODES}, got {c.checkpoint!r}"
    if c.ema is not None and not (_is_number(c.ema) and 0 < c.ema < 1):
        yield f"ema must be a decay in (0, 1) or None (no EMA), got {c.ema!r}"
    if c.grad_clip is not None and not (_is_number(c.grad_clip) and c.grad_clip >= 0):
        yield f"grad_clip must be a non-negative number or None, got {c.grad_clip!r}"
    if not isinstance(c.resume, bool):
        yield f"resume must be True or False, got {c.resume!r}"
    if c.channels_last is not None and not isinstance(c.channels_last, bool):
        yield f"channels_last must be True, False or None (auto), got {c.channels_last!r}"
    if not _valid_device(c.device):
        yield f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {c.device!r}"
    if not (c.cache_bytes == "auto" or (_is_int(c.cache_bytes) and c.cache_bytes >= 0)):
        yield f"cache_bytes must be 'auto' or a non-negative number of bytes, got {c.cache_bytes!r}"


def _valid_device(device) -> bool:
    if not isinstance(device, str):
        return False
    if device in ("auto", "cpu", "cuda"):
        return True
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()


# -- the command line ---------------------------------------------------------------------

def _optional_float(text: str) -> float | None:
    """A float, with 0 / none / off meaning "not used"."""
    if text.strip().lower() in ("none", "off", "0", "0.0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def _auto_or_precision(text: str) -> str | None:
    """--precision: a precision name, or "auto" (None: resolved for the device at the start)."""
    return None if text.strip().lower() == "auto" else precision_argument(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the positional DATA_DIR OUT_DIR and every training flag to `parser`."""
    d = TrainConfig.__dataclass_fields__
    parser.add_argument("data_dir", metavar="DATA_DIR",
                        help="folder of BraTS-layout cases (one folder per case with t1, t1ce, t2, flair, seg)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where checkpoints (last.pt, step_*.pt) and logs (train_log.jsonl) are written")
    model = parser.add_argument_group("network and data")
    model.add_argument("--preset", choices=sorted(PRESETS), default=d["preset"].default,
                       help="network size: 'paper' = the paper's U-Net (24M parameters), 'small' = a CPU-sized "
                            "one (default: %(default)s)")
    model.add_argument("--width", type=int, default=None,
                       help="override the preset's base channel count (model_channels)")
    model.add_argument("--patch", type=int, default=None,
                       help="edge of the cubic training patches in voxels (default: 128 paper, 32 small)")
    model.add_argument("--volume", type=int, default=None,
                       help="edge of the cubic padded volume patches are cut from (default: from the data, "
                            "e.g. 256 for BraTS)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=d["steps"].default,
                       help="total optimizer steps; with --resume the run continues up to this number "
                            "(default: %(default)s)")
    optim.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                       help="patches per step per process (x the number of processes under torchrun) "
                            "(default: %(default)s)")
    optim.add_argument("--lr", type=float, default=None,
                       help="AdamW learning rate (default: 1e-5 paper, 1e-3 small)")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d["lr_schedule"].default,
                       help="constant, or cosine decay to --lr-min-ratio x lr at --steps (default: %(default)s)")
    optim.add_argument("--lr-min-ratio", type=float, default=d["lr_min_ratio"].default,
                       help="final learning rate of the cosine schedule, as a fraction of --lr "
                            "(default: %(default)s)")
    optim.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default,
                       help="linear learning-rate warmup over this many steps (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=d["weight_decay"].default,
                       help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--precision", type=_auto_or_precision, metavar="{" + ",".join(SHORT_NAMES + ("auto",)) + "}",
                       default=d["precision"].default,
                       help="fp32, bf16 autocast, or fp16 autocast with loss scaling (default: auto, bf16 "
                            "where the device computes bfloat16 natively, else fp32)")
    optim.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=d["prediction_type"].default,
                       help="what the network predicts: sample (x0, default), epsilon (the noise, as the "
                            "original PatchDDM) or v_prediction")
    optim.add_argument("--checkpoint", choices=CHECKPOINT_MODES, default=None,
                       help="activation checkpointing to save memory: off, cheap (recompute norms) or "
                            "blocks (recompute whole blocks) (default: paper cheap in fp32 and off in bf16/fp16, "
                            "small off)")
    optim.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last_3d memory format for the convolutions, or not (default: auto, "
                            "where it was measured to pay on the device)")
    optim.add_argument("--ema", type=_optional_float, default=d["ema"].default,
                       help="decay of the exponential moving average of the weights, or 'off' "
                            "(default: %(default)s)")
    optim.add_argument("--grad-clip", type=_optional_float, default=d["grad_clip"].default,
                       help="clip the global gradient norm to this value, or 'off' (default: %(default)s)")
    optim.add_argument("--seed", type=int, default=d["seed"].default,
                       help="seed of initialisation, patches, timesteps and noise (default: %(default)s)")
    run = parser.add_argument_group("checkpoints, validation and resources")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in OUT_DIR from its last.pt (exactly as if never stopped)")
    run.add_argument("--save-every", type=int, default=d["save_every"].default,
                     help="write OUT_DIR/last.pt every this many steps (default: %(default)s)")
    run.add_argument("--keep-every", type=int, default=d["keep_every"].default,
                     help="also keep OUT_DIR/step_NNNNNNN.pt every this many steps, 0 = never "
                          "(default: %(default)s)")
    run.add_argument("--validate-every", type=int, default=d["validate_every"].default,
                     help="sample held-out volumes and report Dice every this many steps and at the end, "
                          "0 = never (default: %(default)s)")
    run.add_argument("--validate-cases", type=int, default=d["validate_cases"].default,
                     help="held-out volumes per validation (default: %(default)s)")
    run.add_argument("--validate-steps", type=int, default=d["validate_steps"].default,
                     help="DDIM steps when validating (default: %(default)s)")
    run.add_argument("--validate-ensemble", type=int, default=d["validate_ensemble"].default,
                     help="ensemble size when validating (default: %(default)s)")
    run.add_argument("--num-workers", type=int, default=d["num_workers"].default,
                     help="data loader worker processes per training process (default: %(default)s)")
    run.add_argument("--device", default=d["device"].default,
                     help="auto, cpu, cuda or cuda:N (default: %(default)s; under torchrun each process "
                          "takes its LOCAL_RANK's GPU)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed arguments (those add_train_arguments added); raises
    ValueError naming every invalid value."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in known}
    return TrainConfig(**values)
