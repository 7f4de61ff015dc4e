"""Dice and HD95 against the number of sampling steps and the ensemble size (the paper's
Figure 5).

For each case and each step count, one ensemble of the largest size is sampled, keeping every
member; the ensemble of size n is its first n members. Member m's noise depends only on the
case's seed and m (diffusion.member_seeds), so these are exactly the ensembles that
`patchddm sample --steps S --ensemble n --seed` would produce, at the cost of one ensemble per
step count instead of one per (steps, size) pair.

Scores are on each case's original grid, whole tumour, as `patchddm evaluate` computes them.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ._files import atomic_write
from .data import CaseError, CaseFiles, DataError
from .evaluation import summarise
from .inference import Segmenter, case_seed, truth_mask
from .metrics import dice, hd95

FIELDS = ("case", "steps", "ensemble", "dice", "hd95")
SUMMARY_FIELDS = ("steps", "ensemble", "cases", "dice_mean", "dice_std", "dice_median", "hd95_mean", "hd95_std",
                  "hd95_median")


@dataclass
class SweepScore:
    case: str
    steps: int
    ensemble: int
    dice: float
    hd95: float


def _positive_sorted(name: str, values: Sequence[int]) -> list[int]:
    values = sorted({int(v) for v in values})
    if not values or values[0] < 1:
        raise DataError(f"{name} must be positive integers, got {values}")
    return values


def sweep_case(segmenter: Segmenter, case: CaseFiles, steps: Sequence[int], ensembles: Sequence[int],
               seed: int) -> list[SweepScore]:
    """Scores of one case for every (steps, ensemble size). Raises CaseError when the case has no
    readable segmentation or cannot be read."""
    prepared = segmenter.prepare(case)
    truth = truth_mask(prepared)
    if truth is None:
        raise CaseError(case.case_id, "has no readable segmentation to score against")
    spacing = prepared.meta.spacing
    largest = max(ensembles)
    scores = []
    for count in steps:
        result = segmenter.segment(prepared, seed=case_seed(seed, case.case_id), steps=count, ensemble=largest,
                                   keep_samples=True)
        samples = result.samples
        for size in ensembles:
            mean = samples[:size].mean(dim=0)
            mask = prepared.meta.to_original((mean > 0.5).cpu().numpy())
            scores.append(SweepScore(case.case_id, count, size, dice(mask, truth), hd95(mask, truth, spacing)))
    return scores


def run_sweep(segmenter: Segmenter, cases: Sequence[CaseFiles], steps: Sequence[int], ensembles: Sequence[int],
              *, seed: int = 0, log: Callable[[str], None] = print) -> tuple[list[SweepScore], dict[str, str]]:
    """(scores of every case, {case_id: error} of the cases that failed)."""
    steps, ensembles = _positive_sorted("steps", steps), _positive_sorted("ensemble sizes", ensembles)
    scores, failed = [], {}
    for number, case in enumerate(cases, 1):
        try:
            case_scores = sweep_case(segmenter, case, steps, ensembles, seed)
        except (CaseError, FloatingPointError, MemoryError, ValueError, RuntimeError, OSError) as error:
            failed[case.case_id] = str(error).removeprefix(f"{case.case_id}: ").splitlines()[0]
            log(f"[{number}/{len(cases)}] {case.case_id}: FAILED: {failed[case.case_id]}")
            continue
        scores += case_scores
        best = max(case_scores, key=lambda s: (s.steps, s.ensemble))
        log(f"[{number}/{len(cases)}] {case.case_id}: Dice {best.dice:.3f}, HD95 {best.hd95:.1f} mm at "
            f"{best.steps} steps, ensemble {best.ensemble}")
    return scores, failed


def summarise_sweep(scores: Sequence[SweepScore]) -> list[dict]:
    """One row per (steps, ensemble): the number of cases and the mean, std, median of Dice and HD95."""
    groups: dict[tuple[int, int], list[SweepScore]] = {}
    for s in scores:
        groups.setdefault((s.steps, s.ensemble), []).append(s)
    rows = []
    for (steps, size), group in sorted(groups.items()):
        stats = summarise({"dice": [s.dice for s in group], "hd95": [s.hd95 for s in group]})
        row = {"steps": steps, "ensemble": size, "cases": len(group)}
        for metric in ("dice", "hd95"):
            for statistic, value in stats[metric].items():
                row[f"{metric}_{statistic}"] = value
        rows.append(row)
    return rows


def _write_rows(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write, newline="")


def write_sweep(out_dir: str | os.PathLike, scores: Sequence[SweepScore], *, title: str = "",
                scheduler: str = "ddim") -> dict[str, Path]:
    """Writes sweep_cases.csv (every case's scores), sweep_summary.csv and sweep.png (its
    x axis names the scheduler)."""
    from .visualize import sweep_plot

    out_dir = Path(out_dir)
    summary = summarise_sweep(scores)
    return {
        "cases": _write_rows(out_dir / "sweep_cases.csv", FIELDS, [asdict(s) for s in scores]),
        "summary": _write_rows(out_dir / "sweep_summary.csv", SUMMARY_FIELDS, summary),
        "plot": sweep_plot(out_dir / "sweep.png", summary, title=title, scheduler=scheduler),
    }


def read_sweep_scores(path: str | os.PathLike) -> list[SweepScore]:
    """The per-case scores of a sweep_cases.csv, e.g. to re-plot or merge sweeps."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [SweepScore(r["case"], int(r["steps"]), int(r["ensemble"]), float(r["dice"]), float(r["hd95"]))
                for r in rows]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a readable sweep_cases.csv ({type(error).__name__}: {error})") from None


def format_sweep(summary: Sequence[dict]) -> str:
    lines = [f"{'steps':>5}  {'ensemble':>8}  {'cases':>5}  {'Dice mean':>9}  {'Dice std':>8}  {'HD95 mean':>9}"]
    for row in summary:
        hd = row["hd95_mean"]
        lines.append(f"{row['steps']:>5}  {row['ensemble']:>8}  {row['cases']:>5}  {row['dice_mean']:>9.4f}  "
                     f"{row['dice_std']:>8.4f}  {'nan' if math.isnan(hd) else f'{hd:.2f}':>9}")
    return "\n".join(lines)


__all__ = ["SweepScore", "format_sweep", "read_sweep_scores", "run_sweep", "summarise_sweep", "sweep_case",
           "write_sweep"]
