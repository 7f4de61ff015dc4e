"""Segmenting cases with a trained model and writing the results as NIfTI files.

For each case: read and preprocess it onto the model's volume grid (the grid it was trained
on, recorded in the checkpoint), sample an ensemble of segmentations of the whole volume with
FullVolumeSampler, and write, on the case's original grid with its affine and header:

    <case_id>_mask.nii.gz          uint8, 1 = tumour: the ensemble mean thresholded at 0.5
    <case_id>_mean.nii.gz          float32, the ensemble mean
    <case_id>_uncertainty.nii.gz   float32, the per-voxel standard deviation across the ensemble
    <case_id>_montage.png          slices through the tumour (patchddm_fast.visualize)

A case that cannot be read or sampled is reported and the others go on; every file is written
under a temporary name and renamed, so an interrupted or failing run never leaves a half-written
file and never touches the outputs of other cases. Each case's seed is derived from the run's
seed and its case id, so a case gets the same result whichever other cases are in the folder.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import PAPER_VOLUME, CaseError, CaseFiles, DataError, PreparedCase, find_cases, load_case, prepare_raw
from .data.preprocess import as_shape
from .diffusion import DDIMScheduler, FullVolumeSampler, NoiseSchedule, SegmentationResult
from .nn import CheckpointMismatchError, read_state_dict
from .precision import precision_name

OUTPUT_KINDS = ("mask", "mean", "uncertainty", "montage")
IMAGE_CHANNELS = 4  # t1, t1ce, t2, flair
FLAIR = 3
MODEL_IN_CHANNELS = IMAGE_CHANNELS + 3 + 1  # + coordinates + x_t
RUN_LOG = "sampling.json"


def output_path(output_dir: str | os.PathLike, case_id: str, kind: str) -> Path:
    """Where `patchddm sample` writes output `kind` (mask, mean, uncertainty, montage) of a case."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {OUTPUT_KINDS}")
    suffix = ".png" if kind == "montage" else ".nii.gz"
    return Path(output_dir) / f"{case_id}_{kind}{suffix}"


def case_seed(seed: int, case_id: str) -> int:
    """The ensemble seed of one case: a function of the run's seed and the case id only."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), zlib.crc32(case_id.encode())]).generate_state(2)
    return (int(state[1]) << 32 | int(state[0])) & (2**62 - 1)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (the first GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {name}: no CUDA device is visible here (torch CUDA "
                            f"{torch.version.cuda or 'not built in'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DataError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise DataError(f"--device {name}: only cpu and cuda devices are supported")
    return device


# -- the model --------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A network ready to sample, with what sampling needs to know about its training."""
    model: torch.nn.Module
    volume_shape: tuple[int, int, int] | None  # the padded training volume (None: not recorded)
    patch_shape: tuple[int, int, int] | None
    schedule: NoiseSchedule
    info: dict
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _shape_or_none(value, name: str):
    if value is None:
        return None
    try:
        return as_shape(value, name)
    except (TypeError, ValueError):
        return None


def _schedule_from(info: dict) -> NoiseSchedule:
    """The noise schedule a checkpoint was trained with: info["schedule"] is a NoiseSchedule, a
    name, or settings {"name", "num_timesteps", "beta_start", "beta_end"} as the trainer
    records them; PatchDDM's (linear, 1000 steps) when the checkpoint does not say."""
    schedule = info.get("schedule")
    if isinstance(schedule, NoiseSchedule):
        return schedule
    settings = dict(schedule) if isinstance(schedule, dict) else {"name": schedule or "linear"}
    name, steps = settings.get("name", "linear"), settings.get("num_timesteps", 1000)
    try:
        if name == "linear":
            return NoiseSchedule.linear(int(steps), float(settings.get("beta_start", 1e-4)),
                                        float(settings.get("beta_end", 0.02)))
        return NoiseSchedule.from_name(str(name), int(steps))
    except (TypeError, ValueError) as error:
        raise CheckpointMismatchError(f"the checkpoint's noise schedule {schedule!r} is not usable: {error}") from None


def _recorded_extra(path: Path) -> dict:
    """The `extra` entry of a patchddm_fast checkpoint (memory-mapped: the weights are not read)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    extra = payload.get("extra") if isinstance(payload, dict) else None
    return extra if isinstance(extra, dict) else {}


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


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = True) -> LoadedModel:
    """Loads a checkpoint written by `patchddm train` (or by patchddm_fast.nn.save_checkpoint,
    or converted by `patchddm import-checkpoint`) for sampling, in eval mode on `device`.

    Raises DataError when the file is missing, CheckpointMismatchError when it is not a
    checkpoint of a PatchDDM segmentation network (naming what does not fit)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not a checkpoint file")
    from .train import load_trained_model

    device = torch.device(device)
    try:
        model, info = load_trained_model(path, ema=ema, map_location="cpu")
    except CheckpointMismatchError as error:
        if _is_plain_state_dict(path):
            raise CheckpointMismatchError(
                f"{path}: holds a bare state_dict (like the original PatchDDM's checkpoints), not a patchddm_fast "
                f"checkpoint; convert it first with `patchddm import-checkpoint {path.name} converted.pt`") from None
        raise error from None
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointMismatchError(f"{path}: cannot be loaded as a patchddm_fast checkpoint "
                                      f"({type(error).__name__}: {error})") from None
    info = dict(info or {})
    if info.get("volume_shape") is None:  # e.g. written by `patchddm import-checkpoint`
        recorded = _recorded_extra(path)
        for key in ("volume_shape", "patch_shape", "schedule"):
            if info.get(key) is None and recorded.get(key) is not None:
                info[key] = recorded[key]
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    out_channels = getattr(config, "out_channels", None)
    if in_channels != MODEL_IN_CHANNELS or out_channels != 1:
        raise CheckpointMismatchError(
            f"{path}: the network takes {in_channels} input and gives {out_channels} output channels; PatchDDM "
            f"segmentation needs {MODEL_IN_CHANNELS} in (4 MR sequences, 3 coordinates, x_t) and 1 out")
    model = model.to(device).eval()
    return LoadedModel(model, _shape_or_none(info.get("volume_shape"), "volume_shape"),
                       _shape_or_none(info.get("patch_shape"), "patch_shape"), _schedule_from(info), info, path)


# -- sampling ---------------------------------------------------------------------------------

@dataclass
class SamplingSettings:
    """How `patchddm sample` samples each case (see its --help)."""
    steps: int = 20
    ensemble: int = 5
    seed: int = 0
    precision: str = "float32"
    eta: float = 0.0
    tiled: bool = False
    tile_shape: tuple | None = None  # default: the training patch, else 128^3
    volume_shape: tuple | None = None  # default: the training volume, else 256^3

    def __post_init__(self):
        for name in ("steps", "ensemble"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        try:
            self.precision = precision_name(self.precision)
        except ValueError as error:
            raise DataError(str(error)) from None


class Segmenter:
    """Samples whole-volume segmentations of prepared cases with one loaded model."""

    def __init__(self, loaded: LoadedModel, settings: SamplingSettings, *, progress: bool = True):
        self.loaded, self.settings, self.progress = loaded, settings, progress
        self.volume_shape = as_shape(settings.volume_shape or loaded.volume_shape or PAPER_VOLUME, "volume_shape")
        self._samplers: dict = {}

    def sampler(self, steps: int | None = None, ensemble: int | None = None) -> FullVolumeSampler:
        steps = steps or self.settings.steps
        ensemble = ensemble or self.settings.ensemble
        if not 1 <= steps <= self.loaded.schedule.num_timesteps:
            raise DataError(f"steps must lie in [1, {self.loaded.schedule.num_timesteps}] (the model's "
                            f"diffusion steps), got {steps}")
        key = (steps, ensemble)
        if key not in self._samplers:
            scheduler = DDIMScheduler(self.loaded.schedule, eta=self.settings.eta).set_timesteps(steps)
            tile = self.settings.tile_shape or self.loaded.patch_shape or (128, 128, 128)
            self._samplers[key] = FullVolumeSampler(
                self.loaded.model, scheduler=scheduler, ensemble_size=ensemble, precision=self.settings.precision,
                image_channels=IMAGE_CHANNELS, coord_shape=self.volume_shape, tiled=self.settings.tiled,
                tile_shape=as_shape(tile, "tile_shape"), progress=self.progress)
        return self._samplers[key]

    def prepare(self, case: CaseFiles) -> PreparedCase:
        """Reads a case onto the volume grid, with its segmentation when it has a readable one
        (used only for pictures and evaluation). Raises CaseError."""
        try:
            raw = load_case(case, with_label=case.has_label)
        except CaseError as error:
            if not case.has_label or error.path != case.files.get("seg"):
                raise
            raw = load_case(case, with_label=False)  # a bad segmentation does not stop sampling
            raw.warnings.append(f"segmentation not used: {error}")
        shape = tuple(raw.images.shape[1:])
        if any(n > v for n, v in zip(shape, self.volume_shape)):
            raise CaseError(case.case_id, f"its grid {shape} is larger than the model's volume grid "
                            f"{self.volume_shape} (the grid it was trained on); pass a larger --volume")
        return prepare_raw(raw, self.volume_shape)

    def segment(self, prepared: PreparedCase, *, seed: int | None = None, steps: int | None = None,
                ensemble: int | None = None, keep_samples: bool = False) -> SegmentationResult:
        seed = case_seed(self.settings.seed, prepared.case_id) if seed is None else seed
        return self.sampler(steps, ensemble).sample(prepared.image, seed=seed, keep_samples=keep_samples)


def truth_mask(prepared: PreparedCase) -> np.ndarray | None:
    """The whole-tumour ground truth on the original grid, or None without a segmentation."""
    if prepared.label is None:
        return None
    return prepared.meta.to_original(prepared.label.numpy()) > 0


def write_case_outputs(output_dir: str | os.PathLike, prepared: PreparedCase, result: SegmentationResult,
                       *, montage: bool = True) -> dict[str, Path]:
    """Writes mask, mean and uncertainty (and the montage) of one case; returns their paths."""
    meta, case_id = prepared.meta, prepared.case_id
    written = {
        "mask": meta.save(output_path(output_dir, case_id, "mask"), result.mask, dtype=np.uint8),
        "mean": meta.save(output_path(output_dir, case_id, "mean"), result.mean, dtype=np.float32),
        "uncertainty": meta.save(output_path(output_dir, case_id, "uncertainty"), result.std, dtype=np.float32),
    }
    if montage:
        from .visualize import case_montage

        # FLAIR in the model's [-1, 1] range: the background (-1) stays black
        flair = meta.to_original(prepared.image[FLAIR].numpy(), fill=-1.0)
        written["montage"] = case_montage(
            output_path(output_dir, case_id, "montage"), flair, meta.to_original(result.mask.cpu().numpy()),
            meta.to_original(result.std.cpu().numpy()), meta.affine, truth=truth_mask(prepared),
            title=f"{case_id}: {len(result.seeds)} sample(s)")
    return written


# -- a folder of cases ------------------------------------------------------------------------

@dataclass
class CaseOutcome:
    case_id: str
    status: str  # "ok", "failed", "skipped"
    message: str = ""
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


@dataclass
class SampleReport:
    outcomes: list[CaseOutcome]
    output_dir: Path

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def succeeded(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "ok"]


def _print(message: str) -> None:
    print(message, flush=True)


def _update_run_log(output_dir: Path, settings: SamplingSettings, checkpoint: Path, outcome: CaseOutcome,
                    seed: int | None) -> None:
    """Records each case's settings and seed in OUTPUT/sampling.json (kept across runs)."""
    path = output_dir / RUN_LOG
    try:
        log = json.loads(path.read_text())
        if not isinstance(log, dict) or not isinstance(log.get("cases"), dict):
            raise ValueError
    except (OSError, ValueError):
        log = {"cases": {}}
    log["cases"][outcome.case_id] = {
        "status": outcome.status, "message": outcome.message, "seconds": round(outcome.seconds, 2),
        "checkpoint": str(checkpoint), "steps": settings.steps, "ensemble": settings.ensemble,
        "run_seed": settings.seed, "case_seed": seed, "precision": settings.precision, "tiled": settings.tiled,
        "outputs": {k: Path(p).name for k, p in outcome.outputs.items()}, "warnings": outcome.warnings}
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(log, indent=1, sort_keys=True))
    os.replace(partial, path)


def sample_folder(checkpoint: str | os.PathLike, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                  settings: SamplingSettings, *, device: str = "auto", skip_existing: bool = False,
                  montage: bool = True, progress: bool = True,
                  log: Callable[[str], None] = _print) -> SampleReport:
    """Samples every case of `input_path` (one case folder, or a folder of cases) into
    output_dir. Problems with single cases are reported in the returned SampleReport; problems
    with the whole run (no cases, unreadable checkpoint) raise DataError or
    CheckpointMismatchError before anything is written."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: exists and is not a folder")
    cases, report = find_cases(input_path, with_label=False)
    # An OUTPUT inside INPUT holds our own results, not a case.
    outputs = output_dir.resolve()
    cases = [c for c in cases if not c.folder.resolve().is_relative_to(outputs)]
    problems = [p for p in report.errors if not (p.case_id == output_dir.name and outputs.is_relative_to(
        Path(input_path).expanduser().resolve()))]
    if not cases and not problems:
        raise DataError(f"{input_path}: holds no case besides the output folder {output_dir}")
    loaded = load_model(checkpoint, device=resolve_device(device))
    segmenter = Segmenter(loaded, settings, progress=progress)
    segmenter.sampler()  # checks the steps against the model's schedule before any work
    output_dir.mkdir(parents=True, exist_ok=True)

    outcomes = [CaseOutcome(p.case_id, "failed", p.message) for p in problems]
    for outcome in outcomes:
        log(f"{outcome.case_id}: FAILED: {outcome.message}")
    log(f"{len(cases)} case(s) to sample from {input_path} on {loaded.device} ({settings.steps} steps, "
        f"ensemble {settings.ensemble}, {settings.precision}{', tiled' if settings.tiled else ''}; volume grid "
        f"{segmenter.volume_shape}) into {output_dir}")
    for number, case in enumerate(cases, 1):
        prefix = f"[{number}/{len(cases)}] {case.case_id}"
        if skip_existing and all(output_path(output_dir, case.case_id, k).exists()
                                 for k in OUTPUT_KINDS if montage or k != "montage"):
            outcomes.append(CaseOutcome(case.case_id, "skipped", "outputs exist"))
            log(f"{prefix}: skipped (outputs exist)")
            continue
        start = time.perf_counter()
        seed = case_seed(settings.seed, case.case_id)
        try:
            prepared = segmenter.prepare(case)
            result = segmenter.segment(prepared, seed=seed)
            written = write_case_outputs(output_dir, prepared, result, montage=montage)
        except (CaseError, FloatingPointError, MemoryError, ValueError, RuntimeError, OSError) as error:
            message = str(error).removeprefix(f"{case.case_id}: ").splitlines()[0]
            outcome = CaseOutcome(case.case_id, "failed", message, time.perf_counter() - start)
            log(f"{prefix}: FAILED: {message}")
        else:
            outcome = CaseOutcome(case.case_id, "ok", "", time.perf_counter() - start, written,
                                  list(prepared.warnings))
            tumour = int(result.mask.sum())
            log(f"{prefix}: done in {outcome.seconds:.1f} s, {tumour} tumour voxels "
                f"(mean uncertainty in the tumour {float(result.std[result.mask].mean()) if tumour else 0.0:.3f})")
            for note in prepared.warnings:
                log(f"{prefix}: warning: {note}")
        outcomes.append(outcome)
        _update_run_log(output_dir, settings, loaded.path, outcome, seed)
    return SampleReport(outcomes, output_dir)
