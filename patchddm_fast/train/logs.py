"""What a run reports: a JSON line per step, TensorBoard scalars when tensorboard is
installed, and a progress bar with the loss and the throughput. Only rank 0 writes.

OUT_DIR/train_log.jsonl:      {"step", "loss", "lr", "patches_per_s", "time"} per step
                              (step = optimizer steps done, time = seconds since the run began,
                              counting earlier sessions of a resumed run)
OUT_DIR/validation_log.jsonl: {"step", "dice", "cases": {case id: Dice}, "seconds"} per validation
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger("patchddm_fast")

STEP_LOG = "train_log.jsonl"
VALIDATION_LOG = "validation_log.jsonl"


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file (a torn last line, from a killed run, is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_jsonl(path, last_step: int) -> None:
    """Keeps only records with step <= last_step (atomically): a resumed run re-does the steps
    after its checkpoint, and their first records would otherwise appear twice."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        logger.debug("patchddm_fast: tensorboard is not installed; no TensorBoard scalars")
        return None
    return SummaryWriter(str(folder))


class RunLog:
    """The logs of one process's run: everything is a no-op unless `active` (rank 0)."""

    def __init__(self, out_dir, *, active: bool, total_steps: int, first_step: int, progress: bool,
                 time_offset: float = 0.0):
        self.active = active
        self.out_dir = Path(out_dir)
        self.time_offset = time_offset
        self._steps = self._validations = self._board = None
        self._bar = tqdm(total=total_steps, initial=first_step, desc="training", unit="step",
                         disable=not (active and progress), dynamic_ncols=True)
        if active:
            truncate_jsonl(self.out_dir / STEP_LOG, first_step)
            truncate_jsonl(self.out_dir / VALIDATION_LOG, first_step)
            self._steps = open(self.out_dir / STEP_LOG, "a", buffering=1)
            self._validations = open(self.out_dir / VALIDATION_LOG, "a", buffering=1)
            self._board = _tensorboard_writer(self.out_dir / "tensorboard")

    def step(self, step: int, loss: float, lr: float, patches_per_s: float, elapsed: float,
             smoothed_loss: float) -> None:
        if not self.active:
            return
        record = {"step": step, "loss": loss, "lr": lr, "patches_per_s": round(patches_per_s, 4),
                  "time": round(self.time_offset + elapsed, 3)}
        self._steps.write(json.dumps(record) + "\n")
        if self._board is not None:
            self._board.add_scalar("train/loss", loss, step)
            self._board.add_scalar("train/lr", lr, step)
            self._board.add_scalar("train/patches_per_s", patches_per_s, step)
        self._bar.set_postfix(loss=f"{smoothed_loss:.4f}", patches_s=f"{patches_per_s:.2f}", refresh=False)
        self._bar.update(1)

    def validation(self, step: int, dice: float, cases: dict, seconds: float) -> None:
        if not self.active:
            return
        record = {"step": step, "dice": dice, "cases": cases, "seconds": round(seconds, 2)}
        self._validations.write(json.dumps(record) + "\n")
        if self._board is not None:
            self._board.add_scalar("validation/dice", dice, step)
        self.message(f"step {step}: validation Dice {dice:.4f} on {len(cases)} case(s) ({seconds:.0f} s)")

    def message(self, text: str, important: bool = False) -> None:
        """A line above the progress bar, or else to the log (at warning level when important,
        so that it shows even where logging is not configured)."""
        if not self.active:
            return
        if self._bar.disable:
            logger.log(logging.WARNING if important else logging.INFO, "patchddm_fast: %s", text)
        else:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        for handle in (self._steps, self._validations):
            if handle is not None:
                handle.close()
        if self._board is not None:
            self._board.close()
        self._steps = self._validations = self._board = None
