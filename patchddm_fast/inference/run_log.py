"""OUTPUT/sampling.json: each case's settings, seed, time and status, kept across runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .segmenter import SamplingSettings

if TYPE_CHECKING:
    from .folder import CaseOutcome

RUN_LOG = "sampling.json"


def update_run_log(output_dir: Path, settings: SamplingSettings, checkpoint: Path, outcome: CaseOutcome,
                    seed: int | None) -> None:
    """Records each case's settings and seed in OUTPUT/sampling.json (kept across runs)."""
    path = output_dir / RUN_LOG
    try:
        log = json.loads(path.read_text())
        if not isinstance(log, dict) or not isinstance(log.get("cases"), dict):
            raise ValueError
    except (OSError, ValueError):
        log = {"cases": {}}
    log["cases"][outcome.case_id] = {
        "status": outcome.status, "message": outcome.message, "seconds": round(outcome.seconds, 2),
        "checkpoint": str(checkpoint), "steps": settings.steps, "ensemble": settings.ensemble,
        "run_seed": settings.seed, "case_seed": seed, "precision": settings.precision,
        "scheduler": settings.scheduler, "eta": settings.eta, "tiled": settings.tiled,
        "outputs": {k: Path(p).name for k, p in outcome.outputs.items()}, "warnings": outcome.warnings}
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(log, indent=1, sort_keys=True))
    os.replace(partial, path)
