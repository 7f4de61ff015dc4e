"""`patchddm demo`: the whole workflow on synthetic data, on this machine.

1. writes synthetic brain-tumour phantoms in BraTS's layout (OUT/data);
2. trains a small PatchDDM on patches of the training cases with the trainer's demo recipe
   (patchddm_fast.train.demo_recipe; checkpoints and logs in OUT/train);
3. samples the whole held-out volumes (the split's validation and test cases, never seen in
   training) with a small ensemble (OUT/predictions: mask, mean, uncertainty, montage per case);
4. scores them against their ground truth (OUT/evaluation.csv) and prints the table, where
   everything is, and last `mean Dice <value>`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, find_cases, split_cases, write_phantoms
from .evaluation import Evaluation, evaluate_folders, format_table, write_csv
from .inference import SamplingSettings, Segmenter, case_seed, load_model, resolve_device, write_case_outputs


@dataclass(frozen=True)
class DemoPlan:
    """What the demo does besides training (the trainer's demo_recipe says how to train)."""
    cases: int = 10  # phantoms written; the split holds out 1 validation and 1 test case of 10
    size: int = 48  # phantom grid (voxels per axis)
    seed: int = 0
    steps: int = 10  # DDIM steps for sampling the held-out volumes
    ensemble: int = 3


QUICK = DemoPlan(cases=4, size=32, steps=2, ensemble=2)


@dataclass
class DemoResult:
    out_dir: Path
    mean_dice: float
    evaluation: Evaluation | None
    checkpoint: Path | None
    seconds: float
    failed_cases: list[str] = field(default_factory=list)
    interrupted: bool = False


def _trainer():
    import importlib

    try:
        return importlib.import_module(f"{__package__}.train")
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.train":
            raise DataError("the demo needs the trainer (patchddm_fast.train), which is not installed in this copy") \
                from None
        raise


def _training_config(trainer, data_dir: Path, train_dir: Path, plan: DemoPlan, quick: bool, device: str):
    """The trainer's demo recipe pointed at the demo's folders (and shortened for --quick)."""
    config = trainer.demo_recipe()
    changes = {"data_dir": data_dir, "out_dir": train_dir}
    names = {f.name for f in dataclasses.fields(config)}
    if "device" in names:
        changes["device"] = device
    if "volume_shape" in names:
        changes["volume_shape"] = (plan.size,) * 3
    if quick and "steps" in names:
        changes["steps"] = min(int(config.steps), 20)
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if k in names})


def run_demo(out_dir: str | Path = "patchddm_demo", *, quick: bool = False, device: str = "auto",
             plan: DemoPlan | None = None, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, flush=True)) -> DemoResult:
    plan = plan or (QUICK if quick else DemoPlan())
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    device = str(resolve_device(device))
    trainer = _trainer()
    start = time.perf_counter()
    data_dir, train_dir, pred_dir = out_dir / "data", out_dir / "train", out_dir / "predictions"

    log(f"[1/4] writing {plan.cases} phantoms of {plan.size}^3 to {data_dir}")
    write_phantoms(data_dir, n=plan.cases, shape=(plan.size,) * 3, seed=plan.seed, progress=progress)
    cases, _ = find_cases(data_dir)
    parts = split_cases(cases)
    held_out = parts["validation"] + parts["test"]
    log(f"      {len(parts['train'])} training case(s); held out: {', '.join(c.case_id for c in held_out)}")

    config = _training_config(trainer, data_dir, train_dir, plan, quick, device)
    log(f"[2/4] training on {device} ({train_dir})")
    trained = trainer.train(config, progress=progress)
    checkpoint = Path(trained.checkpoint)
    if trained.interrupted:
        log(f"training interrupted; the last checkpoint is {checkpoint}")
        return DemoResult(out_dir, float("nan"), None, checkpoint, time.perf_counter() - start, interrupted=True)

    log(f"[3/4] sampling {len(held_out)} held-out volume(s): {plan.steps} steps, ensemble {plan.ensemble}")
    loaded = load_model(checkpoint, device=device)
    segmenter = Segmenter(loaded, SamplingSettings(steps=plan.steps, ensemble=plan.ensemble, seed=plan.seed),
                          progress=progress)
    for case in held_out:
        prepared = segmenter.prepare(case)
        result = segmenter.segment(prepared, seed=case_seed(plan.seed, case.case_id))
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
