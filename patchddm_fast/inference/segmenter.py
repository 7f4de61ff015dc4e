"""Sampling whole-volume segmentations of cases with one loaded model: the settings of a run,
each case's seed, reading a case onto the model's volume grid, and the ensemble sampler."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..data import PAPER_VOLUME, CaseError, CaseFiles, DataError, PreparedCase, load_case, prepare_raw
from ..data.preprocess import as_shape
from ..diffusion import FullVolumeSampler, PlanOptions, SegmentationResult
from ..diffusion.full_volume import _model_size_multiple as model_size_multiple
from ..diffusion.scheduler_names import SCHEDULER_NAMES, make_scheduler
from ..precision import precision_name
from .model import IMAGE_CHANNELS, LoadedModel


def case_seed(seed: int, case_id: str) -> int:
    """The ensemble seed of one case: a function of the run's seed and the case id only."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), zlib.crc32(case_id.encode())]).generate_state(2)
    return (int(state[1]) << 32 | int(state[0])) & (2**62 - 1)


@dataclass
class SamplingSettings:
    """How `patchddm sample` samples each case (see its --help)."""
    steps: int = 20
    ensemble: int = 5
    seed: int = 0
    precision: str = "float32"
    eta: float = 0.0
    scheduler: str = "ddim"  # ddim, ddpm or dpmsolver++ (patchddm_fast.diffusion.SCHEDULER_NAMES)
    tiled: bool = False
    tile_shape: tuple | None = None  # default: the training patch, else 128^3
    volume_shape: tuple | None = None  # default: the training volume, else 256^3

    def __post_init__(self):
        for name in ("steps", "ensemble"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if self.scheduler not in SCHEDULER_NAMES:
            raise DataError(f"scheduler must be one of {SCHEDULER_NAMES}, got {self.scheduler!r}")
        if self.scheduler != "ddim" and self.eta != 0:
            raise DataError(f"eta applies to the ddim scheduler only, got eta={self.eta} with {self.scheduler}")
        if not self.eta >= 0:
            raise DataError(f"eta must be >= 0 (0: deterministic DDIM), got {self.eta}")
        try:
            self.precision = precision_name(self.precision)
        except ValueError as error:
            raise DataError(str(error)) from None


def check_tile(tile, model) -> None:
    """--tile must be a multiple of the network's size multiple (it halves the grid that often)."""
    multiple = model_size_multiple(model)
    if any(int(n) % multiple for n in tile):
        nearest = ",".join(str(max(multiple, round(int(n) / multiple) * multiple)) for n in tile)
        raise DataError(f"--tile {','.join(map(str, tile))}: each side must be a multiple of {multiple}, the "
                        f"network's size multiple (e.g. --tile {nearest})")


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
            scheduler = make_scheduler(self.settings.scheduler, self.loaded.schedule, steps, eta=self.settings.eta,
                                       prediction_type=self.loaded.info.prediction_type)
            tile = self.settings.tile_shape or self.loaded.patch_shape or (128, 128, 128)
            check_tile(tile, self.loaded.model)
            options = PlanOptions(image_channels=IMAGE_CHANNELS, tiled=self.settings.tiled,
                                  tile_shape=as_shape(tile, "tile_shape"))
            self._samplers[key] = FullVolumeSampler(
                self.loaded.model, scheduler=scheduler, ensemble_size=ensemble, precision=self.settings.precision,
                coord_shape=self.volume_shape, options=options, progress=self.progress)
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
