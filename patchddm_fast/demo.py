"""`patchddm demo`: the whole workflow on synthetic data, on this machine.

1. writes synthetic brain-tumour phantoms in BraTS's layout (OUT/data);
2. trains a small PatchDDM on patches of the training cases (checkpoints and the training
   log in OUT/train);
3. samples the whole held-out volumes (the split's validation and test cases, never seen in
   training) with the recipe's small ensemble (OUT/predictions: mask, mean, uncertainty and a
   montage per case, as `patchddm sample` writes them);
4. scores them against their ground truth (OUT/evaluation.csv) and prints the table, where
   everything is, and last `mean Dice <value>` (printed by the command).

--quick shrinks every stage (fewer and smaller phantoms, a few dozen training steps, 2 sampling
steps): a smoke test of the whole chain in a minute or two, not a good segmentation.

Every setting of the demo is in DemoRecipe, plain data; run_demo only carries it out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, find_cases, split_cases, write_phantoms
from .device import resolve_device
from .evaluation import FolderScores, evaluate_folders, format_table, write_csv
from .inference import SamplingSettings, Segmenter, case_seed, load_model, write_case_outputs
from .train import TrainConfig, train


@dataclass(frozen=True)
class DemoRecipe:
    """Phantoms: `cases` cases of size^3 voxels from phantom_seed (the split keeps 10% + 10%
    out of training). Training: the TrainConfig fields from preset to seed. Sampling: DDIM
    with sample_steps steps and an ensemble of `ensemble` per held-out volume."""

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

    def replace(self, **changes) -> "DemoRecipe":
        return dataclasses.replace(self, **changes)


RECIPE = DemoRecipe()
# --quick: 4 phantoms of 32^3, 20 training steps of 2 patches, 2 sampling steps, ensemble of 2
QUICK_CHANGES = dict(cases=4, size=32, steps=20, batch_size=2, warmup_steps=5, sample_steps=2, ensemble=2)
_NOT_TRAINING = ("cases", "size", "phantom_seed", "sample_steps", "ensemble")


def quick_recipe(recipe: DemoRecipe) -> DemoRecipe:
    """The --quick variant of a recipe."""
    return recipe.replace(**QUICK_CHANGES)


def train_config(recipe: DemoRecipe, data_dir, out_dir, **overrides) -> TrainConfig:
    """The recipe's TrainConfig (checkpoints every 100 steps, no periodic validation)."""
    values = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in _NOT_TRAINING}
    values.update(save_every=100, validate_every=0)
    values.update(overrides)
    return TrainConfig(data_dir, out_dir, **values)


def held_out_cases(data_dir) -> list:
    """The cases of data_dir that training does not see (validation and test parts)."""
    cases, _ = find_cases(data_dir)
    parts = split_cases(cases)
    return parts["validation"] + parts["test"]


@dataclass
class DemoResult:
    out_dir: Path
    mean_dice: float
    evaluation: FolderScores | None
    checkpoint: Path | None
    seconds: float
    failed_cases: list[str] = field(default_factory=list)
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=dict)  # phantoms, training, sampling, evaluation


def run_demo(out_dir: str | Path = "patchddm_demo", *, quick: bool = False, device: str = "auto",
             recipe: DemoRecipe | None = None, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, flush=True)) -> DemoResult:
    """Runs the demo under out_dir (see the module docstring). recipe: default RECIPE, or its
    quick variant."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    device = str(resolve_device(device))
    if recipe is None:
        recipe = quick_recipe(RECIPE) if quick else RECIPE
    start = time.perf_counter()
    stages, lap = {}, [start]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name], lap[0] = now - lap[0], now

    data_dir, train_dir, pred_dir = out_dir / "data", out_dir / "train", out_dir / "predictions"

    log(f"[1/4] writing {recipe.cases} phantoms of {recipe.size}^3 voxels to {data_dir}")
    write_phantoms(data_dir, n=recipe.cases, shape=(recipe.size,) * 3, seed=recipe.phantom_seed, progress=progress)
    held_out = held_out_cases(data_dir)
    log(f"      held out from training: {', '.join(c.case_id for c in held_out)}")
    stage("phantoms")

    config = train_config(recipe, data_dir, train_dir, device=device)
    log(f"[2/4] training a {config.preset} PatchDDM for {config.steps} steps on {device} (into {train_dir})")
    trained = train(config, progress=progress)
    if trained.interrupted or trained.checkpoint is None:
        log(f"training stopped after {trained.steps} steps; its last checkpoint: {trained.checkpoint}")
        return DemoResult(out_dir, float("nan"), None, trained.checkpoint, time.perf_counter() - start,
                          interrupted=True, stage_seconds=stages)
    checkpoint = Path(trained.checkpoint)
    log(f"      {trained.steps} steps in {trained.seconds / 60:.1f} min, last loss {trained.last_loss:.4f}")
    stage("training")

    log(f"[3/4] sampling {len(held_out)} held-out whole volume(s): {recipe.sample_steps} DDIM steps, "
        f"ensemble of {recipe.ensemble}")
    settings = SamplingSettings(steps=recipe.sample_steps, ensemble=recipe.ensemble, seed=recipe.seed)
    segmenter = Segmenter(load_model(checkpoint, device=device), settings, progress=progress)
    for case in held_out:
        prepared = segmenter.prepare(case)
        result = segmenter.segment(prepared, seed=case_seed(recipe.seed, case.case_id))
        write_case_outputs(pred_dir, prepared, result)
        log(f"      {case.case_id}: {int(result.mask.sum())} tumour voxels")
    stage("sampling")

    log("[4/4] evaluating")
    evaluation = evaluate_folders(pred_dir, data_dir)
    csv_path = write_csv(evaluation, out_dir / "evaluation.csv")
    stage("evaluation")
    seconds = time.perf_counter() - start
    log(format_table(evaluation))
    log(f"everything is in {out_dir}:")
    log(f"  phantoms     {data_dir}")
    log(f"  checkpoint   {checkpoint}")
    log(f"  predictions  {pred_dir}  (mask, mean, uncertainty NIfTI and a montage PNG per case)")
    log(f"  scores       {csv_path}")
    log(f"demo finished in {seconds / 60:.1f} min ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in stages.items()) + ")")
    return DemoResult(out_dir, evaluation.summary()["dice"]["mean"], evaluation, checkpoint, seconds,
                      [s.case_id for s in evaluation.failed], stage_seconds=stages)
