"""OUTPUT/sampling.json: each case's settings, seed, time and status, kept across runs.

It is also what `--skip-existing` trusts. A case's record is written last, after all of its
outputs, and names the checkpoint (by a SHA-256 of the file) and the settings that made them, and
each output file's size and SHA-256. Before a case's outputs are (re)written its record is set to
"writing", so a run interrupted half-way through a case never leaves a record that vouches for
the files. A case is skipped only when its record says "ok", was made by the same checkpoint and
settings, and every output it needs is there with the recorded contents; otherwise it is redone.
So the outputs of a case are never a mixture of two runs, and the record credits the run that
wrote them (a skipped case keeps its record).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._files import atomic_write_text
from .outputs import OUTPUT_KINDS, output_path
from .segmenter import SamplingSettings

if TYPE_CHECKING:
    from .folder import CaseOutcome

RUN_LOG = "sampling.json"
WRITING = "writing"  # the status of a case whose outputs are being written


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_CHECKPOINT_HASHES: dict[tuple, str] = {}


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file, computed once per (path, size, mtime) in this process."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKPOINT_HASHES:
        _CHECKPOINT_HASHES[key] = file_sha256(path)
    return _CHECKPOINT_HASHES[key]


def settings_record(settings: SamplingSettings) -> dict:
    """The settings that decide a case's outputs, as plain JSON values."""
    def shape(value):
        return list(value) if value is not None else None

    return {"steps": settings.steps, "ensemble": settings.ensemble, "run_seed": settings.seed,
            "precision": settings.precision, "scheduler": settings.scheduler, "eta": settings.eta,
            "tiled": settings.tiled, "tile": shape(settings.tile_shape), "volume": shape(settings.volume_shape)}


def read_run_log(output_dir: str | os.PathLike) -> dict:
    """OUTPUT/sampling.json, or an empty log when it is missing or unreadable."""
    try:
        log = json.loads((Path(output_dir) / RUN_LOG).read_text())
        if not isinstance(log, dict) or not isinstance(log.get("cases"), dict):
            raise ValueError
    except (OSError, ValueError):
        log = {"cases": {}}
    return log


def _write_run_log(output_dir: Path, log: dict) -> None:
    atomic_write_text(Path(output_dir) / RUN_LOG, json.dumps(log, indent=1, sort_keys=True))


def case_is_complete(output_dir: str | os.PathLike, case_id: str, settings: SamplingSettings,
                     checkpoint: str | os.PathLike, kinds=OUTPUT_KINDS) -> bool:
    """Whether a case's outputs of `kinds` are all there, unchanged since its record was written,
    and were made by this checkpoint with these settings: what --skip-existing may skip."""
    entry = read_run_log(output_dir)["cases"].get(case_id)
    if not isinstance(entry, dict) or entry.get("status") != "ok":
        return False
    if entry.get("checkpoint_sha256") != checkpoint_sha256(checkpoint):
        return False
    if entry.get("settings") != settings_record(settings):
        return False
    files = entry.get("files")
    if not isinstance(files, dict):
        return False  # a record of an older version, which did not say what it wrote
    for kind in kinds:
        recorded, path = files.get(kind), output_path(output_dir, case_id, kind)
        if not isinstance(recorded, dict) or not path.is_file() or path.stat().st_size != recorded.get("size"):
            return False
        if file_sha256(path) != recorded.get("sha256"):
            return False
    return True


def begin_case(output_dir: str | os.PathLike, case_id: str, settings: SamplingSettings,
               checkpoint: str | os.PathLike, kinds=OUTPUT_KINDS, *, write_record: bool = True) -> None:
    """Before a case's outputs are (re)written: its record says "writing" (so no half-rewritten
    case is ever trusted), and outputs of kinds this run does not write (the montage with
    --no-montage), which an earlier run made, are removed so that they cannot be mixed in.
    write_record False (the other processes of a torchrun run, where rank 0 alone writes
    sampling.json): the record stays as it is; the outputs' recorded hashes still keep a
    half-rewritten case from being skipped."""
    output_dir = Path(output_dir)
    if write_record:
        log = read_run_log(output_dir)
        log["cases"][case_id] = {"status": WRITING, "checkpoint": str(checkpoint),
                                 "checkpoint_sha256": checkpoint_sha256(checkpoint),
                                 "settings": settings_record(settings)}
        _write_run_log(output_dir, log)
    for kind in OUTPUT_KINDS:
        if kind not in kinds:
            output_path(output_dir, case_id, kind).unlink(missing_ok=True)


def update_run_log(output_dir: Path, settings: SamplingSettings, checkpoint: Path, outcome: CaseOutcome,
                   seed: int | None) -> None:
    """Records a case's outcome, settings and seed in OUTPUT/sampling.json (kept across runs),
    after its outputs are written. A skipped case keeps the record of the run that wrote it."""
    if outcome.status == "skipped":
        return
    log = read_run_log(output_dir)
    files = {kind: {"size": Path(p).stat().st_size, "sha256": file_sha256(p)} for kind, p in outcome.outputs.items()}
    record = settings_record(settings)
    log["cases"][outcome.case_id] = {
        "status": outcome.status, "message": outcome.message, "seconds": round(outcome.seconds, 2),
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256(checkpoint), "settings": record,
        "steps": settings.steps, "ensemble": settings.ensemble,
        "run_seed": settings.seed, "case_seed": seed, "precision": settings.precision,
        "scheduler": settings.scheduler, "eta": settings.eta, "tiled": settings.tiled,
        "outputs": {k: Path(p).name for k, p in outcome.outputs.items()}, "files": files,
        "warnings": outcome.warnings}
    _write_run_log(output_dir, log)
