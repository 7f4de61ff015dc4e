"""The demo's recipe: synthetic phantoms, a short CPU training run, held-out full volumes sampled
with a small ensemble, Dice.

demo_recipe() holds the settings (chosen to reach a mean Dice of at least 0.7 on the held-out
phantoms within 10 minutes on a 2-core CPU, all steps included); run_demo() runs all of it and
reports the time of each stage:

    python -m patchddm_fast.train.demo OUT_DIR [--steps N] [--cases N] ...

The held-out phantoms are those the split keeps out of training (patchddm_fast.data.split_cases:
10% validation and 10% test); both are scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import find_cases, split_cases, write_phantoms
from .config import SAMPLER_PRECISION, TrainConfig
from .trainer import train
from .validation import evaluate_checkpoint


@dataclass(frozen=True)
class DemoRecipe:
    """Phantoms: `cases` cases of size^3 voxels from phantom_seed (the split keeps 10% + 10%
    out of training). Training: the TrainConfig fields below. Sampling: DDIM with
    sample_steps steps and an ensemble of `ensemble` per held-out volume."""

    cases: int = 24
    size: int = 48
    phantom_seed: int = 0
    preset: str = "small"
    width: int | None = None
    patch: int = 32
    volume: int | None = None
    steps: int = 600
    batch_size: int = 4
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    lr_min_ratio: float = 0.05
    warmup_steps: int = 50
    ema: float | None = 0.99
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    channels_last: bool = False
    num_workers: int = 0
    seed: int = 0
    sample_steps: int = 10
    ensemble: int = 3

    _TRAIN_FIELDS = ("preset", "width", "patch", "volume", "steps", "batch_size", "lr", "lr_schedule",
                     "lr_min_ratio", "warmup_steps", "ema", "grad_clip", "precision", "channels_last",
                     "num_workers", "seed")

    def train_config(self, data_dir, out_dir, **overrides) -> TrainConfig:
        """The TrainConfig of the recipe (checkpoints every 100 steps, no periodic validation)."""
        values = {name: getattr(self, name) for name in self._TRAIN_FIELDS}
        values.update(save_every=100, validate_every=0)
        values.update(overrides)
        return TrainConfig(data_dir, out_dir, **values)

    def write_phantoms(self, folder, progress: bool = False):
        return write_phantoms(folder, n=self.cases, shape=(self.size,) * 3, seed=self.phantom_seed, progress=progress)

    @staticmethod
    def held_out(data_dir) -> list:
        """The cases of data_dir that training does not see (validation and test parts)."""
        cases, _ = find_cases(data_dir)
        parts = split_cases(cases)
        return parts["validation"] + parts["test"]

    def evaluate(self, checkpoint, data_dir, progress: bool = False):
        """Dice of a checkpoint on the held-out cases of data_dir, sampled as the demo does."""
        return evaluate_checkpoint(checkpoint, self.held_out(data_dir), steps=self.sample_steps, ensemble=self.ensemble,
                                   seed=self.seed, precision=SAMPLER_PRECISION[self.precision], progress=progress,
                                   channels_last=self.channels_last)

    def replace(self, **changes) -> "DemoRecipe":
        return dataclasses.replace(self, **changes)


def demo_recipe() -> DemoRecipe:
    """The settings of `patchddm demo` (see DemoRecipe)."""
    return DemoRecipe()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_demo(out_dir, recipe: DemoRecipe | None = None, *, progress: bool = True) -> dict:
    """Phantoms, training and evaluation of `recipe` under out_dir (phantoms/, model/); returns
    {"dice", "cases", and wall / CPU seconds of each stage}."""
    recipe = recipe or demo_recipe()
    out_dir = Path(out_dir)
    report = {"recipe": dataclasses.asdict(recipe)}
    clock, cpu = time.perf_counter(), _cpu_seconds()

    def lap(name):
        nonlocal clock, cpu
        now, now_cpu = time.perf_counter(), _cpu_seconds()
        report[f"{name}_s"], report[f"{name}_cpu_s"] = round(now - clock, 2), round(now_cpu - cpu, 2)
        clock, cpu = now, now_cpu

    data_dir = out_dir / "phantoms"
    recipe.write_phantoms(data_dir, progress=progress)
    lap("phantoms")
    result = train(recipe.train_config(data_dir, out_dir / "model"), progress=progress)
    lap("training")
    evaluation = recipe.evaluate(result.checkpoint, data_dir, progress=progress)
    lap("sampling")
    report.update(dice=evaluation.mean_dice, cases=evaluation.cases, last_loss=result.last_loss)
    report["total_s"] = round(sum(report[f"{k}_s"] for k in ("phantoms", "training", "sampling")), 2)
    return report


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the demo recipe and report Dice and timings "
                                                 "(recipe fields can be overridden, e.g. --steps 800)")
    parser.add_argument("out_dir")
    for field in dataclasses.fields(DemoRecipe):
        if not field.name.startswith("_"):
            kind = type(field.default) if field.default is not None else (
                int if field.name in ("width", "volume") else float)
            if kind is bool:
                kind = _boolean
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    recipe = demo_recipe().replace(**{k: v for k, v in args.items() if v is not None})
    report = run_demo(out_dir, recipe)
    Path(out_dir, "demo_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"mean Dice {report['dice']:.4f}")


if __name__ == "__main__":
    main()
