"""The patch trainer: the diffusion loss on random patches, AdamW, checkpoints that never lose work.

One step: a batch of patches from the data loader (image, coordinates and an empty x_t channel,
written by the fused input assembly), the fused q_sample writes x_t in place, the U-Net predicts
the noise under autocast, the MSE is back-propagated (scaled for fp16), gradients are unscaled
and clipped, AdamW steps, the EMA follows. Every random draw of a step is a function of the run's
seed and the sample numbers (see objective.py and patchddm_fast.data.patches), so a resumed
run repeats exactly what the uninterrupted one would have done, and data-parallel processes
together do what one process does on the combined batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._files import atomic_write_text
from ..checkpoint_info import CheckpointInfo
from ..data import DataError, PatchDataset, find_cases, make_patch_loader, split_cases
from ..data.nifti import read_header
from ..diffusion import NoiseSchedule, diffusion_loss
from ..nn import CheckpointMismatchError, UNet3D
from .checkpoints import (LAST, checkpoint_exists, read_training_checkpoint, remove_stale_temporaries,
                          restore_rng_states, rng_states, save_training_checkpoint, step_path)
from ..precision import parse_precision
from .config import TrainConfig
from ..distributed import Distributed
from .ema import WeightAverage
from .interrupt import StopRequest, ignore_interrupts
from .logs import RunLog
from .objective import sample_draws, sample_numbers
from .validation import Validator

logger = logging.getLogger("patchddm_fast")

_MAX_SKIPPED = 5  # consecutive steps with non-finite gradients before a run gives up


@dataclass
class TrainResult:
    """checkpoint: the last checkpoint written (None if none could be); steps: optimizer steps
    done in total; last_loss: the loss of the last step (mean over processes); interrupted:
    stopped by Ctrl-C / SIGTERM / a callback before reaching config.steps; validation_dice:
    the mean Dice of the last validation (None without); seconds: this session's wall time."""
    checkpoint: Path | None
    steps: int
    last_loss: float | None
    interrupted: bool
    validation_dice: float | None
    out_dir: Path
    seconds: float


SPLIT = "split.json"  # the cases of each part of the split, written at the start of a run

def data_volume_edge(cases, size_multiple: int) -> int:
    """The padded volume of a data set: a cube whose edge is the longest axis of the first
    readable case, rounded up to a multiple of lcm(size_multiple, 16) (BraTS's 240 x 240 x 155
    -> 256 for the paper's network, as the original pads; 64^3 phantoms -> 64). Only NIfTI
    headers are read."""
    problems = []
    for case in cases:
        try:
            shape = read_header(case.files["t1"]).shape[:3]
        except Exception as exc:  # any unreadable header: try the next case
            problems.append(f"{case.files.get('t1')}: {exc}")
            continue
        multiple = math.lcm(size_multiple, 16)
        return multiple * math.ceil(max(shape) / multiple)
    raise DataError("cannot tell the volume size (set it explicitly): no readable t1 header\n  " + "\n  ".join(problems))


class _Run:
    """One session of a training run in one process (see train())."""

    def __init__(self, config: TrainConfig, distributed: Distributed, stop: StopRequest, progress: bool,
                 callback):
        self.dist, self.stop, self.callback = distributed, stop, callback
        self.device = distributed.device
        # precision and channels_last left to "auto" take the device's fastest settings here,
        # so that the checkpoint records what ran.
        config, execution = config.execution(self.device)
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.started = time.perf_counter()
        self.step = self.samples_done = 0
        self.elapsed_before = 0.0
        self.last_loss = None
        self.validation_dice = None
        self.saved_step = None
        self.consistent = True  # False while the parameters and optimizer are being updated
        self.skipped = 0  # consecutive updates skipped for non-finite gradients
        self.checkpoint_path = None

        self._prepare_out_dir()
        train_cases, validation_cases = self._cases()
        network = config.network
        self.patch = config.patch_edge
        resumed = self._read_resume() if config.resume else None
        if resumed is not None:
            self._check_compatible(resumed)
        self.volume = config.volume or (CheckpointInfo.from_dict(resumed[1]).volume_shape[0] if resumed
                                        else data_volume_edge(train_cases, network.size_multiple))
        self.volume = max(self.volume, self.patch) if config.volume is None else self.volume
        self.schedule = NoiseSchedule.linear()  # PatchDDM's (guided-diffusion's linear betas)

        torch.manual_seed(config.seed)  # the initial weights
        self.model = UNet3D(network, fused=True, checkpoint=config.memory_option,
                            channels_last=config.channels_last).to(self.device)
        # The fused AdamW (one kernel over all parameters; CPU and CUDA): half the time of the
        # per-parameter loop in a CPU step of the paper network, the same update up to rounding.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr_at(0),
                                           weight_decay=config.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        fp16 = parse_precision(config.precision) == torch.float16  # only fp16 needs loss scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.ema = WeightAverage(self.model, config.ema) if config.ema else None
        if resumed is not None:
            self._restore(*resumed)
        self.trained = distributed.wrap(self.model)

        self.dataset = PatchDataset(train_cases, patch_shape=self.patch, volume_shape=self.volume, seed=config.seed,
                                    cache_bytes=config.cache_bytes)
        self.validator = None
        if config.validate_every and distributed.is_main:
            if validation_cases:
                self.validator = Validator(validation_cases[:config.validate_cases], (self.volume,) * 3,
                                           steps=config.validate_steps, ensemble=config.validate_ensemble,
                                           schedule=self.schedule, precision=config.precision,
                                           seed=config.seed, prediction_type=config.prediction_type)
            else:
                logger.warning("patchddm_fast: no validation cases in %s (the split gave none); validation is off",
                               config.data_dir)
        self.log = RunLog(self.out_dir, active=distributed.is_main, total_steps=config.steps, first_step=self.step,
                          progress=progress, time_offset=self.elapsed_before)
        self.log.message(execution, important=True)
        if resumed is not None:
            self.log.message(f"resumed from {self.out_dir / LAST} at step {self.step}")
        self._record_split()

    # -- setup ------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        c = self.config
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"{self.out_dir}: exists and is not a folder")
        if c.resume and not checkpoint_exists(self.out_dir):
            raise FileNotFoundError(f"{self.out_dir}: nothing to resume, there is no {LAST} in it")
        if not c.resume and checkpoint_exists(self.out_dir):
            raise FileExistsError(f"{self.out_dir}: already holds a training run ({LAST}); pass resume=True "
                                  "(--resume) to continue it, or choose another output folder")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
        self.dist.barrier()

    def _cases(self):
        cases, report = find_cases(self.config.data_dir)
        if report.problems and self.dist.is_main:
            logger.warning("patchddm_fast: problems in %s:\n%s", self.config.data_dir, report.format())
        parts = split_cases(cases)
        if not parts["train"]:
            raise DataError(f"{self.config.data_dir}: the split left no training cases (of {len(cases)} usable)")
        self.split = {name: [case.case_id for case in part] for name, part in parts.items()}
        return parts["train"], parts["validation"]

    def _record_split(self) -> None:
        """Says which cases training holds out, and writes them to out_dir/split.json (what
        `patchddm sample --subset` and `sweep --subset` pick), so nobody scores training cases
        by mistake."""
        if not self.dist.is_main:
            return
        path = self.out_dir / SPLIT
        atomic_write_text(path, json.dumps({"data_dir": str(self.config.data_dir), **self.split}, indent=1))
        held = ", ".join(f"{name} {len(self.split[name])} ({' '.join(self.split[name]) or '-'})"
                         for name in ("validation", "test"))
        self.log.message(f"split of {self.config.data_dir}: train {len(self.split['train'])}, {held}; "
                         f"written to {path}", important=True)

    def _read_resume(self):
        return read_training_checkpoint(self.out_dir / LAST, map_location=self.device)

    def _check_compatible(self, resumed) -> None:
        model, extra = resumed
        c = self.config
        if model.config != c.network:
            raise CheckpointMismatchError(f"{self.out_dir / LAST}: its network {model.config} differs from the one asked for "
                             f"({c.network}; preset {c.preset!r}, width {c.width}); resume with the same settings")
        info = CheckpointInfo.from_dict(extra)
        patch, volume = info.patch_shape[0], info.volume_shape[0]
        if patch != c.patch_edge:
            raise CheckpointMismatchError(f"{self.out_dir / LAST}: trained on {patch}^3 patches, but --patch "
                                          f"{c.patch_edge}; resume with the same settings")
        if c.volume is not None and volume != c.volume:
            raise CheckpointMismatchError(f"{self.out_dir / LAST}: trained on a {volume}^3 volume, but --volume "
                                          f"{c.volume}; resume with the same settings")
        before = extra["train_config"]
        if before.get("seed") != c.seed:
            logger.warning("patchddm_fast: resuming with seed %s instead of %s: later draws differ from an "
                           "uninterrupted run", c.seed, before.get("seed"))
        if before.get("batch_size", 0) * extra.get("world_size", 1) != c.batch_size * self.dist.world_size:
            logger.warning("patchddm_fast: the global batch changed since the checkpoint; the run continues from "
                           "the same data position but is no longer identical to an uninterrupted one")

    def _restore(self, model: UNet3D, extra: dict) -> None:
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.scaler.is_enabled() and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None and extra.get("ema"):
            self.ema.load_state_dict(extra["ema"])
            self.ema.decay = self.config.ema
        elif self.ema is not None:  # EMA switched on only now: it starts from the resumed weights
            self.ema = WeightAverage(self.model, self.config.ema)
        restore_rng_states(extra["rng"])
        self.step, self.samples_done = int(extra["step"]), int(extra["samples_done"])
        self.elapsed_before = float(extra.get("elapsed", 0.0))
        self.last_loss = extra.get("last_loss")
        self.saved_step = self.step

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        c = self.config
        resolved = c.replace(patch=self.patch, volume=self.volume, lr=c.learning_rate, checkpoint=c.memory_option)
        info = CheckpointInfo(self.schedule, prediction_type=c.prediction_type, volume_shape=(self.volume,) * 3,
                              patch_shape=(self.patch,) * 3,
                              image_channels=self.model.config.in_channels - 4, step=self.step,
                              precision=c.precision, last_loss=self.last_loss, train_config=resolved.to_dict())
        return dict(info.to_dict(), samples_done=self.samples_done, optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    ema=self.ema.state_dict() if self.ema is not None else None, rng=rng_states(),
                    world_size=self.dist.world_size, elapsed=self.elapsed_before + time.perf_counter() - self.started)

    def save(self, keep: bool = False) -> None:
        """Writes last.pt (and step_NNNNNNN.pt when keep) on rank 0."""
        if self.dist.is_main:
            state = self._state()
            if keep:
                save_training_checkpoint(step_path(self.out_dir, self.step), self.model, **state)
            save_training_checkpoint(self.out_dir / LAST, self.model, **state)
        self.saved_step = self.step
        self.checkpoint_path = self.out_dir / LAST

    def _save_after_failure(self) -> None:
        """A checkpoint of the state as it stands, when it is consistent and newer than the last."""
        if not self.consistent or self.saved_step == self.step:
            return
        try:
            self.save()
            self.log.message(f"saved {self.out_dir / LAST} at step {self.step}", important=True)
        except Exception as exc:  # the original error matters more
            logger.error("patchddm_fast: could not save a checkpoint after the failure: %s", exc)

    # -- the loop ---------------------------------------------------------------------------
    def _loader(self):
        loader = make_patch_loader(self.dataset, self.config.batch_size, num_workers=self.config.num_workers,
                                   start=self.samples_done, rank=self.dist.rank, world_size=self.dist.world_size,
                                   pin_memory=self.device.type == "cuda")
        if self.config.num_workers > 0:
            loader.worker_init_fn = ignore_interrupts
        return loader

    def _train_step(self, batch) -> tuple[float, bool]:
        """One optimizer step; returns (loss averaged over processes, whether any process asked to stop)."""
        c, world = self.config, self.dist.world_size
        inputs = batch.input.to(self.device, non_blocking=True)
        mask = batch.mask.to(self.device, non_blocking=True)
        numbers = sample_numbers(self.samples_done, c.batch_size, self.dist.rank, world)
        timesteps, seeds = sample_draws(c.seed, numbers, self.schedule.num_timesteps)
        lr = c.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(self.trained, inputs, mask, self.schedule, timesteps=timesteps, seed=seeds,
                              precision=c.precision, prediction_type=c.prediction_type)
        total, votes = self.dist.sum([loss.item(), 1.0 if self.stop.requested else 0.0])
        mean_loss = total / world
        if not math.isfinite(mean_loss) and not self.scaler.is_enabled():
            raise FloatingPointError(f"the loss is {mean_loss} at step {self.step + 1} (precision {c.precision}); "
                                     f"{self.out_dir / LAST} holds the last good state (try a lower lr or fp32)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients)
        if self.scaler.is_enabled() or math.isfinite(norm.item()):
            self.skipped = 0
            if c.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), c.grad_clip, norm)
            self.consistent = False
            self.scaler.step(self.optimizer)  # fp16: skipped by the scaler when not finite
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            # Without loss scaling a non-finite gradient would poison the weights; leave them
            # as they are for this batch (all processes see the same reduced gradients).
            self.skipped += 1
            self.log.message(f"step {self.step + 1}: non-finite gradients, the update is skipped", important=True)
            if self.skipped >= _MAX_SKIPPED:
                raise FloatingPointError(f"non-finite gradients in {self.skipped} steps in a row up to step "
                                         f"{self.step + 1} (precision {c.precision}); "
                                         f"{self.out_dir / LAST} holds the last good state (try a lower lr or fp32)")
        self.step += 1
        self.samples_done += c.batch_size * world
        self.last_loss = mean_loss
        self.consistent = True
        return mean_loss, votes > 0

    def _validate(self) -> None:
        """Validation on rank 0 (the others wait). A failure (say, no memory for a full volume)
        is reported and training goes on: it must not cost the run."""
        if self.validator is not None:
            try:
                evaluation = self.validator.evaluate(self.ema.module if self.ema is not None else self.model)
            except Exception as exc:
                self.log.message(f"step {self.step}: validation failed, training goes on: "
                                 f"{type(exc).__name__}: {exc}", important=True)
            else:
                self.validation_dice = evaluation.mean_dice
                self.log.validation(self.step, evaluation.mean_dice, evaluation.cases, evaluation.seconds)
        self.dist.barrier()

    def run(self) -> TrainResult:
        c = self.config
        interrupted = False
        if self.step >= c.steps:
            self.log.message(f"nothing to do: {self.step} steps done already (steps={c.steps})")
            self.checkpoint_path = self.out_dir / LAST
            self.log.close()
            return self._result(False)
        self.trained.train()
        smoothed = None
        try:
            batches = iter(self._loader())
            last = time.perf_counter()
            while self.step < c.steps:
                loss, stop = self._train_step(next(batches))
                now = time.perf_counter()
                rate = c.batch_size * self.dist.world_size / max(now - last, 1e-9)
                last = now
                smoothed = loss if smoothed is None or not math.isfinite(smoothed) else 0.9 * smoothed + 0.1 * loss
                self.log.step(self.step, loss, c.lr_at(self.step - 1), rate, now - self.started, smoothed)
                if self.callback is not None and self.callback(self.step, loss):
                    stop = True
                finished = self.step == c.steps
                keep = bool(c.keep_every) and self.step % c.keep_every == 0
                if stop or finished or keep or self.step % c.save_every == 0:
                    self.save(keep=keep)
                if c.validate_every and (finished or self.step % c.validate_every == 0):
                    self._validate()
                    last = time.perf_counter()  # validation time is not training throughput
                if stop and not finished:
                    interrupted = True
                    why = self.stop.signal_name or "a stop request"
                    self.log.message(f"stopped by {why} after step {self.step}; saved {self.out_dir / LAST} "
                                     "(continue with --resume)", important=True)
                    break
        except KeyboardInterrupt:
            if self.stop.requested:  # a second Ctrl-C: stop at once, as asked
                raise
            interrupted = True
            self._save_after_failure()
            if not self.consistent:
                self.log.message(f"interrupted during a parameter update; {self.out_dir / LAST} holds step "
                                 f"{self.saved_step}", important=True)
        except BaseException:
            self._save_after_failure()
            raise
        finally:
            self.log.close()
        return self._result(interrupted)

    def _result(self, interrupted: bool) -> TrainResult:
        path = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.exists() else None
        return TrainResult(checkpoint=path, steps=self.step, last_loss=self.last_loss, interrupted=interrupted,
                           validation_dice=self.validation_dice, out_dir=self.out_dir,
                           seconds=time.perf_counter() - self.started)


def train(config: TrainConfig, *, progress: bool = True, callback=None) -> TrainResult:
    """Trains (or, with config.resume, continues training) PatchDDM's U-Net; see TrainConfig.

    Under torchrun each process trains on its own share of every batch (DistributedDataParallel)
    and only rank 0 writes files. Ctrl-C or SIGTERM: the current step finishes, last.pt is
    written, and the result says interrupted=True (a second Ctrl-C stops at once).
    progress: a progress bar (rank 0). callback(step, loss) -> truthy to stop after that step
    (as Ctrl-C would); it runs on every process, and in data-parallel runs must answer alike.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    distributed = Distributed(config.device)
    try:
        with StopRequest() as stop:
            return _Run(config, distributed, stop, progress, callback).run()
    finally:
        distributed.close()
