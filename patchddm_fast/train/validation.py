"""Validation: segment held-out full volumes with a small DDIM ensemble and score them with Dice.

Used by the trainer (periodic validation) and to evaluate a trained checkpoint
(evaluate_checkpoint). Dice is computed on each case's original voxel grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import CaseFiles, prepare_case
from ..diffusion import DDIMScheduler, FullVolumeSampler, NoiseSchedule
from ..metrics import dice
from .checkpoints import load_trained_model


@dataclass
class ValidationScores:
    """Per case Dice (case id -> Dice), their mean, and the seconds it took. (Scores of a
    folder of predictions, with HD95, are patchddm_fast.evaluation.FolderScores.)"""
    cases: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.cases.values()))) if self.cases else float("nan")


class Validator:
    """Segments `cases` (their volumes prepared once, then kept) with `model`.

    volume_shape: the padded grid of training (the coordinates' frame); steps / ensemble:
    DDIM steps and ensemble size; schedule: the training noise schedule (default PatchDDM's);
    precision: any name patchddm_fast.precision accepts; seed: the ensembles' seed (the same every time, so
    validations of different steps compare the model, not the noise).
    """

    def __init__(self, cases: Sequence[CaseFiles], volume_shape, *, steps: int = 10, ensemble: int = 3,
                 schedule=None, precision: str = "float32", seed: int = 0, progress: bool = False,
                 prediction_type: str = "epsilon"):
        self.cases = list(cases)
        self.volume_shape = tuple(volume_shape)
        self.steps, self.ensemble, self.seed = steps, ensemble, seed
        self.schedule = schedule if schedule is not None else NoiseSchedule.linear()
        self.precision, self.progress = precision, progress
        self.prediction_type = prediction_type
        self._prepared = None

    def _volumes(self):
        if self._prepared is None:
            self._prepared = [prepare_case(case, self.volume_shape) for case in self.cases]
        return self._prepared

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> ValidationScores:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        scheduler = DDIMScheduler(self.schedule, eta=0.0, prediction_type=self.prediction_type).set_timesteps(self.steps)
        sampler = FullVolumeSampler(model, scheduler=scheduler, ensemble_size=self.ensemble,
                                    precision=self.precision, coord_shape=self.volume_shape, progress=self.progress)
        result = ValidationScores()
        try:
            for prepared in self._volumes():
                segmentation = sampler.sample(prepared.image.to(device), seed=self.seed)
                predicted = prepared.meta.to_original(segmentation.mask.cpu().numpy())
                target = prepared.meta.to_original(prepared.label.numpy() > 0)
                result.cases[prepared.case_id] = dice(predicted, target)
        finally:
            model.train(was_training)
        result.seconds = time.perf_counter() - started
        return result


def evaluate_checkpoint(path, cases: Sequence[CaseFiles], *, steps: int = 10, ensemble: int = 3, seed: int = 0,
                        ema: bool = True, precision: str = "float32", device: str = "cpu",
                        progress: bool = False, **options) -> ValidationScores:
    """Dice of a checkpoint (trained, or imported by `patchddm import-checkpoint`) on `cases`
    (with segmentations), sampled as the trainer's validation does, on the checkpoint's
    training volume grid. options: UNet3D options (e.g. channels_last=True)."""
    model, info = load_trained_model(path, ema=ema, map_location=device, **options)
    if info.volume_shape is None:
        raise ValueError(f"{path}: the checkpoint does not record its training volume shape (written by "
                         "neither the trainer nor `patchddm import-checkpoint`)")
    validator = Validator(cases, info.volume_shape, steps=steps, ensemble=ensemble, schedule=info.schedule,
                          precision=precision, seed=seed, progress=progress,
                          prediction_type=info.prediction_type)
    return validator.evaluate(model)
