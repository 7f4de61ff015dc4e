"""`patchddm demo`: the whole workflow on synthetic data, on this machine.

1. writes synthetic brain-tumour phantoms in BraTS's layout (OUT/data);
2. trains a small PatchDDM on patches of the training cases with the trainer's demo recipe
   (patchddm_fast.train.demo_recipe; checkpoints and the training log in OUT/train);
3. samples the whole held-out volumes (the split's validation and test cases, never seen in
   training) with the recipe's small ensemble (OUT/predictions: mask, mean, uncertainty and a
   montage per case, as `patchddm sample` writes them);
4. scores them against their ground truth (OUT/evaluation.csv) and prints the table, where
   everything is, and last `mean Dice <value>` (printed by the command).

--quick shrinks every stage (fewer and smaller phantoms, a few dozen training steps, 2 sampling
steps): a smoke test of the whole chain in a minute or two, not a good segmentation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError
from .evaluation import Evaluation, evaluate_folders, format_table, write_csv
from .inference import SamplingSettings, Segmenter, case_seed, load_model, resolve_device, write_case_outputs
from .train import demo_recipe, train


@dataclass
class DemoResult:
    out_dir: Path
    mean_dice: float
    evaluation: Evaluation | None
    checkpoint: Path | None
    seconds: float
    failed_cases: list[str] = field(default_factory=list)
    interrupted: bool = False


def quick_recipe(recipe):
    """The --quick variant of a demo recipe: 4 phantoms of 32^3, 20 training steps of 2 patches,
    2 sampling steps with an ensemble of 2."""
    return recipe.replace(cases=4, size=32, steps=20, batch_size=2, warmup_steps=5, sample_steps=2, ensemble=2)


def run_demo(out_dir: str | Path = "patchddm_demo", *, quick: bool = False, device: str = "auto", recipe=None,
             progress: bool = True, log: Callable[[str], None] = lambda m: print(m, flush=True)) -> DemoResult:
    """Runs the demo under out_dir (see the module docstring). recipe: a
    patchddm_fast.train.DemoRecipe (default: demo_recipe(), or its quick variant)."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    device = str(resolve_device(device))
    if recipe is None:
        recipe = quick_recipe(demo_recipe()) if quick else demo_recipe()
    start = time.perf_counter()
    data_dir, train_dir, pred_dir = out_dir / "data", out_dir / "train", out_dir / "predictions"

    log(f"[1/4] writing {recipe.cases} phantoms of {recipe.size}^3 voxels to {data_dir}")
    recipe.write_phantoms(data_dir, progress=progress)
    held_out = recipe.held_out(data_dir)
    log(f"      held out from training: {', '.join(c.case_id for c in held_out)}")

    config = recipe.train_config(data_dir, train_dir, device=device)
    log(f"[2/4] training a {config.preset} PatchDDM for {config.steps} steps on {device} (into {train_dir})")
    trained = train(config, progress=progress)
    if trained.interrupted or trained.checkpoint is None:
        log(f"training stopped after {trained.steps} steps; its last checkpoint: {trained.checkpoint}")
        return DemoResult(out_dir, float("nan"), None, trained.checkpoint, time.perf_counter() - start,
                          interrupted=True)
    checkpoint = Path(trained.checkpoint)
    log(f"      {trained.steps} steps in {trained.seconds / 60:.1f} min, last loss {trained.last_loss:.4f}")

    log(f"[3/4] sampling {len(held_out)} held-out whole volume(s): {recipe.sample_steps} DDIM steps, "
        f"ensemble of {recipe.ensemble}")
    settings = SamplingSettings(steps=recipe.sample_steps, ensemble=recipe.ensemble, seed=recipe.seed)
    segmenter = Segmenter(load_model(checkpoint, device=device), settings, progress=progress)
    for case in held_out:
        prepared = segmenter.prepare(case)
        result = segmenter.segment(prepared, seed=case_seed(recipe.seed, case.case_id))
        write_case_outputs(pred_dir, prepared, result)
        log(f"      {case.case_id}: {int(result.mask.sum())} tumour voxels")

    log("[4/4] evaluating")
    evaluation = evaluate_folders(pred_dir, data_dir)
    csv_path = write_csv(evaluation, out_dir / "evaluation.csv")
    seconds = time.perf_counter() - start
    log(format_table(evaluation))
    log(f"everything is in {out_dir}:")
    log(f"  phantoms     {data_dir}")
    log(f"  checkpoint   {checkpoint}")
    log(f"  predictions  {pred_dir}  (mask, mean, uncertainty NIfTI and a montage PNG per case)")
    log(f"  scores       {csv_path}")
    log(f"demo finished in {seconds / 60:.1f} min")
    return DemoResult(out_dir, evaluation.summary()["dice"]["mean"], evaluation, checkpoint, seconds,
                      [s.case_id for s in evaluation.failed])
