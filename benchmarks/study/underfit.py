"""Why does the demo model underfit? One training run of a variant, scored where it matters.

    OMP_NUM_THREADS=1 python benchmarks/study/underfit.py OUT --variant eps --steps 600

Trains the demo recipe (or a variant of it) on the demo phantoms, then reports, as JSON:
Dice on the held-out cases and on four training cases (whole volume, as the demo samples),
the FLAIR-threshold baseline on the same cases, the loss and the x0 error per timestep band
on training patches. Variants change one thing at a time; see docs/STUDY.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchddm_fast.data import find_cases, split_cases
from patchddm_fast.metrics import dice
from patchddm_fast.ops import q_sample
from patchddm_fast.baseline import FlairThreshold
from patchddm_fast.diffusion.schedulers import predicted_noise
from patchddm_fast.train import checkpoints as ckpt
from patchddm_fast.demo import RECIPE, train_config
from patchddm_fast.data import write_phantoms
from patchddm_fast.train.trainer import train
from patchddm_fast.train.validation import Validator


KINDS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def x0_error_by_band(model, kind, scale, dataset, schedule, n=8):
    """MSE of the predicted x0 (clipped) against the true x0 on n training patches, per t band."""
    bands = [(0, 100), (100, 300), (300, 600), (600, 900), (900, 1000)]
    rng = np.random.default_rng(123)
    result = {}
    model.eval()
    with torch.no_grad():
        for lo, hi in bands:
            errs, dices = [], []
            for i in range(n):
                sample = dataset[int(rng.integers(0, 10_000))]
                x = sample.input[None].clone()
                mask = sample.mask[None]
                t = torch.tensor([int(rng.integers(lo, hi))])
                ab = schedule.alpha_bar(t)
                x0 = mask * scale[0] + scale[1]
                q_sample(x0, ab, seed=int(rng.integers(0, 2**31)), return_noise=False, out=x[:, -1:])
                a, s = float(ab.sqrt()), float((1 - ab).sqrt())
                eps = predicted_noise(model(x, t).float(), x[:, -1:], float(ab), KINDS[kind], True)
                pred = ((x[:, -1:] - s * eps) / a).clamp(-1, 1)
                errs.append(float(((pred - x0) ** 2).mean()))
                pm = (pred - scale[1]) / scale[0] > 0.5
                if mask.sum() > 0:
                    dices.append(float(dice(pm.numpy(), mask.numpy() > 0)))
            result[f"{lo}-{hi}"] = {"x0_mse": round(float(np.mean(errs)), 5),
                                    "patch_dice": round(float(np.mean(dices)), 3) if dices else None}
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=None, help="a phantom folder (default: OUT/../phantoms, made once)")
    p.add_argument("--variant", default="eps", choices=["eps", "x0", "v"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--precision", default="fp32", help="fp32 (the study's ε, x0 and v runs) or bf16")
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--channels-last", type=int, default=1, help="1: channels_last_3d (same math, faster on CPUs)")
    p.add_argument("--lr-schedule", default=None)
    p.add_argument("--warmup", type=int, default=None)
    args = p.parse_args()

    out = Path(args.out)
    recipe = RECIPE.replace(phantom_seed=args.phantom_seed)
    data = Path(args.data) if args.data else out.parent / f"phantoms{args.phantom_seed}"
    if not (data / ".complete").exists():
        write_phantoms(data, n=recipe.cases, shape=(recipe.size,) * 3, seed=recipe.phantom_seed)
        (data / ".complete").write_text("")
    scale = (1.0, 0.0)  # x0 = mask in {0, 1}, as the original
    overrides = {k: v for k, v in dict(lr=args.lr, batch_size=args.batch, ema=args.ema, width=args.width,
                                        patch=args.patch, precision=args.precision, lr_schedule=args.lr_schedule,
                                        warmup_steps=args.warmup).items() if v is not None}
    overrides["channels_last"] = bool(args.channels_last)
    overrides["prediction_type"] = KINDS[args.variant]
    config = train_config(recipe, data, out / "model", steps=args.steps, num_workers=0, **overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(config, progress=False)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    model, info = ckpt.load_trained_model(result.checkpoint, channels_last=bool(args.channels_last))
    schedule = info.schedule
    cases, _ = find_cases(data)
    parts = split_cases(cases)
    held_out = parts["validation"] + parts["test"]
    train_four = parts["train"][:4]
    report = {"args": vars(args), "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
              "last_loss": result.last_loss}

    for name, subset in (("held_out", held_out), ("train4", train_four)):
        wall = time.perf_counter()
        validator = Validator(subset, info.volume_shape, steps=args.sample_steps, ensemble=args.ensemble,
                              schedule=schedule, seed=0, prediction_type=KINDS[args.variant])
        evaluation = validator.evaluate(model)
        report[name] = {k: round(v, 4) for k, v in evaluation.cases.items()}
        report[f"{name}_mean"] = round(float(np.mean(list(evaluation.cases.values()))), 4)
        report[f"{name}_s"] = round(time.perf_counter() - wall, 1)
    rule = FlairThreshold.fit(parts["train"])
    baseline = rule.score(held_out)
    report["flair_threshold"] = rule.threshold
    report["flair_held_out"] = {k: round(v, 4) for k, v in baseline.items()}
    report["flair_held_out_mean"] = round(float(np.mean(list(baseline.values()))), 4)
    from patchddm_fast.data import PatchDataset
    dataset = PatchDataset(parts["train"], patch_shape=info.patch_shape, volume_shape=info.volume_shape,
                           seed=99, cache_bytes=0)
    report["x0_by_t"] = x0_error_by_band(model, args.variant, scale, dataset, schedule)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
