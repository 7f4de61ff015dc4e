"""`patchddm demo`: the whole workflow on synthetic data (or on your own), on this machine.

1. writes synthetic brain-tumour phantoms in BraTS's layout (OUT/data), or takes a BraTS-layout
   folder of your own (--data DIR);
2. trains a small PatchDDM on patches of the training cases of the split (checkpoints, the
   training log and split.json in OUT/train);
3. samples the whole held-out volumes (the split's validation and test cases, never seen in
   training) with the recipe's small ensemble (OUT/predictions: mask, mean, uncertainty and a
   montage per case, as `patchddm sample` writes them);
4. scores them against their ground truth (OUT/evaluation.csv), beside the simplest baseline
   there is: one threshold on the normalised FLAIR, fitted on the training cases
   (patchddm_fast.baseline), and prints where everything is, the wall and CPU time of each
   stage, and last `mean Dice <value>` (printed by the command).

The network predicts x0 (the mask) rather than the noise: docs/STUDY.md shows why that
learns the segmentation several times faster. Sampling runs the diffusion on the whole volume
but evaluates the network on overlapping windows of its training patch size, where its
GroupNorm statistics are those it was trained with (docs/STUDY.md: +0.05 to +0.35 Dice on
held-out phantoms against one whole-volume pass). Precision and memory layout are the fastest
correct ones for the device (patchddm_fast.fast_settings: bfloat16 autocast where the
hardware has it, channels_last_3d on CPUs).

--quick shrinks every stage (fewer and smaller phantoms, a few dozen training steps, 2 sampling
steps): a smoke test of the whole chain in a minute or two, not a good segmentation.

Every setting of the demo is in DemoRecipe, plain data; run_demo only carries it out.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .baseline import baseline_for, format_comparison
from .data import DataError, find_cases, subset_cases, write_phantoms
from .device import resolve_device
from .evaluation import FolderScores, evaluate_folders, format_table, write_csv
from .fast_settings import fastest_thread_count
from .inference import SamplingSettings, Segmenter, case_seed, load_model, write_case_outputs
from .train import TrainConfig, train


@dataclass(frozen=True)
class DemoRecipe:
    """Phantoms: `cases` cases of size^3 voxels from phantom_seed (the split keeps 10% + 10%
    out of training). Training: the TrainConfig fields from preset to seed; precision and
    channels_last None take the device's fastest correct settings (TrainConfig.execution).
    Sampling: DDIM with sample_steps steps and an ensemble of `ensemble` per held-out volume;
    tiled: the network sees overlapping windows of its training patch size rather than the
    whole volume at once (the diffusion still runs on the whole volume)."""

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
    prediction_type: str = "sample"
    precision: str | None = None
    channels_last: bool | None = None
    num_workers: int = 0
    seed: int = 0
    sample_steps: int = 10
    ensemble: int = 3
    tiled: bool = True  # the network on overlapping windows of its training patch (docs/STUDY.md)

    def replace(self, **changes) -> "DemoRecipe":
        return dataclasses.replace(self, **changes)


RECIPE = DemoRecipe()
# --quick: 4 phantoms of 32^3, 20 training steps of 2 patches, 2 sampling steps, ensemble of 2
QUICK_CHANGES = dict(cases=4, size=32, steps=20, batch_size=2, warmup_steps=5, sample_steps=2, ensemble=2)
_NOT_TRAINING = ("cases", "size", "phantom_seed", "sample_steps", "ensemble", "tiled")


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
    return subset_cases(cases, "held-out")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class DemoResult:
    out_dir: Path
    mean_dice: float
    evaluation: FolderScores | None
    checkpoint: Path | None
    seconds: float
    failed_cases: list[str] = field(default_factory=list)
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=dict)      # wall: phantoms, training, sampling, evaluation
    stage_cpu_seconds: dict = field(default_factory=dict)  # CPU (user + system), same stages
    baseline: dict = field(default_factory=dict)           # FLAIR threshold's Dice per held-out case
    baseline_threshold: float | None = None


def _choose_threads(config: TrainConfig, log) -> int:
    """Sets the intra-op thread count that runs a training step of `config` (with its precision
    and layout resolved) fastest here and now (measured; one thread often wins on a shared
    machine). OMP_NUM_THREADS, when set, wins."""
    if "OMP_NUM_THREADS" in os.environ or (os.cpu_count() or 1) == 1:
        return torch.get_num_threads()
    from .nn import UNet3D
    from .precision import autocast

    network = config.network
    model = UNet3D(network, channels_last=config.channels_last)
    x = torch.randn(1, network.in_channels, *(config.patch_edge,) * 3)
    t = torch.tensor([500])

    def step():
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), config.precision):
            out = model(x, t)
        out.float().square().mean().backward()

    threads, times = fastest_thread_count(step, rounds=2)
    torch.set_num_threads(threads)
    log("      threads: " + ", ".join(f"{n}: {s * 1000:.0f} ms/step" for n, s in times.items()) + f" -> {threads}")
    return threads


def run_demo(out_dir: str | Path = "patchddm_demo", *, quick: bool = False, device: str = "auto",
             recipe: DemoRecipe | None = None, data: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, flush=True)) -> DemoResult:
    """Runs the demo under out_dir (see the module docstring). recipe: default RECIPE, or its
    quick variant. data: a BraTS-layout folder to use instead of phantoms (trained on its
    training part, scored on its held-out part)."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    device = resolve_device(device)
    if recipe is None:
        recipe = quick_recipe(RECIPE) if quick else RECIPE
    start, start_cpu = time.perf_counter(), cpu_seconds()
    stages, cpu_stages, lap = {}, {}, [start, start_cpu]

    def stage(name: str) -> None:
        now, now_cpu = time.perf_counter(), cpu_seconds()
        stages[name], cpu_stages[name] = now - lap[0], now_cpu - lap[1]
        lap[:] = [now, now_cpu]

    train_dir, pred_dir = out_dir / "train", out_dir / "predictions"
    data_dir = out_dir / "data" if data is None else Path(data).expanduser()
    if data is not None and not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder")
    config, execution = train_config(recipe, data_dir, train_dir, device=str(device)).execution(device)
    threads = _choose_threads(config, log) if device.type == "cpu" else None
    log(f"      {device}{f' ({threads} threads)' if threads else ''}, {execution}; "
        f"the network predicts {config.prediction_type}")
    if data is None:
        log(f"[1/4] writing {recipe.cases} phantoms of {recipe.size}^3 voxels to {data_dir}")
        write_phantoms(data_dir, n=recipe.cases, shape=(recipe.size,) * 3, seed=recipe.phantom_seed,
                       progress=progress)
    else:
        log(f"[1/4] using the cases of {data_dir}")
    held_out = held_out_cases(data_dir)
    if not held_out:
        raise DataError(f"{data_dir}: the split holds out no case to score (too few cases?)")
    log(f"      held out from training: {', '.join(c.case_id for c in held_out)}")
    stage("phantoms" if data is None else "data")

    log(f"[2/4] training a {config.preset} PatchDDM for {config.steps} steps on {device} (into {train_dir})")
    trained = train(config, progress=progress)
    if trained.interrupted or trained.checkpoint is None:
        log(f"training stopped after {trained.steps} steps; its last checkpoint: {trained.checkpoint}")
        return DemoResult(out_dir, float("nan"), None, trained.checkpoint, time.perf_counter() - start,
                          interrupted=True, stage_seconds=stages, stage_cpu_seconds=cpu_stages)
    checkpoint = Path(trained.checkpoint)
    log(f"      {trained.steps} steps in {trained.seconds / 60:.1f} min, last loss {trained.last_loss:.4f}")
    stage("training")

    log(f"[3/4] sampling {len(held_out)} held-out whole volume(s): {recipe.sample_steps} DDIM steps, "
        f"ensemble of {recipe.ensemble}"
        + (f", the network on {config.patch_edge}^3 windows (its training patch)" if recipe.tiled else ""))
    settings = SamplingSettings(steps=recipe.sample_steps, ensemble=recipe.ensemble, seed=recipe.seed,
                                precision=config.precision, tiled=recipe.tiled,
                                tile_shape=(config.patch_edge,) * 3 if recipe.tiled else None)
    loaded = load_model(checkpoint, device=device, channels_last=config.channels_last)
    segmenter = Segmenter(loaded, settings, progress=progress)
    for case in held_out:
        prepared = segmenter.prepare(case)
        result = segmenter.segment(prepared, seed=case_seed(recipe.seed, case.case_id))
        write_case_outputs(pred_dir, prepared, result)
        log(f"      {case.case_id}: {int(prepared.meta.to_original(result.mask.cpu().numpy()).sum())} tumour voxels")
    stage("sampling")

    log("[4/4] evaluating, beside one threshold on the FLAIR fitted on the training cases")
    evaluation = evaluate_folders(pred_dir, data_dir)
    csv_path = write_csv(evaluation, out_dir / "evaluation.csv")
    model_scores = {s.case_id: s.dice for s in evaluation.scored}
    try:
        rule, baseline = baseline_for(data_dir, list(model_scores))
    except ValueError as error:  # e.g. a folder whose training cases lack images
        rule, baseline = None, {}
        log(f"      no FLAIR baseline: {error}")
    stage("evaluation")
    seconds, cpu_total = time.perf_counter() - start, cpu_seconds() - start_cpu
    log(format_table(evaluation))
    if rule is not None:
        log(format_comparison(model_scores, baseline, rule.threshold))
    log(f"everything is in {out_dir}:")
    log(f"  data         {data_dir}")
    log(f"  checkpoint   {checkpoint}  (split: {train_dir / 'split.json'})")
    log(f"  predictions  {pred_dir}  (mask, mean, uncertainty NIfTI and a montage PNG per case)")
    log(f"  scores       {csv_path}")
    log(f"demo finished in {seconds / 60:.1f} min wall, {cpu_total / 60:.1f} CPU-min ("
        + ", ".join(f"{name} {stages[name]:.0f} s / {cpu_stages[name]:.0f} CPU-s" for name in stages) + ")")
    return DemoResult(out_dir, evaluation.summary()["dice"]["mean"], evaluation, checkpoint, seconds,
                      [s.case_id for s in evaluation.failed], stage_seconds=stages, stage_cpu_seconds=cpu_stages,
                      baseline=baseline, baseline_threshold=rule.threshold if rule is not None else None)
