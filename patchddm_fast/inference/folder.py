"""`patchddm sample` on a folder: every case of INPUT segmented into OUTPUT, a failing case
reported while the others go on, each case's outcome recorded in OUTPUT/sampling.json.

Under torchrun the cases are shared out across the processes (case i to rank i % WORLD_SIZE),
each on its own GPU; rank 0 writes every case's record into sampling.json and reports the run.
A case's seed depends on the run's seed and its id only, so the outputs are the same for any
number of processes."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data import CaseError, DataError, find_cases, subset_cases
from ..distributed import Distributed
from .model import load_model
from .outputs import OUTPUT_KINDS, write_case_outputs
from .run_log import begin_case, case_is_complete, update_run_log
from .segmenter import SamplingSettings, Segmenter, case_seed

OUTPUT_DEVICE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


@dataclass
class CaseOutcome:
    case_id: str
    status: str  # "ok", "failed", "skipped"
    message: str = ""
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


@dataclass
class SampleReport:
    outcomes: list[CaseOutcome]
    output_dir: Path
    # False on the other processes of a torchrun run: rank 0 reports the whole run (every
    # process's report holds every outcome).
    is_main: bool = True

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def succeeded(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "ok"]


def _print(message: str) -> None:
    print(message, flush=True)


def sample_folder(checkpoint: str | os.PathLike, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                  settings: SamplingSettings, *, device: str = "auto", skip_existing: bool = False,
                  montage: bool = True, progress: bool = True, subset: str = "all",
                  log: Callable[[str], None] = _print) -> SampleReport:
    """Samples every case of `input_path` (one case folder, or a folder of cases) into
    output_dir; subset: only one part of the folder's split (patchddm_fast.data.SUBSETS, e.g.
    "held-out", the cases a model trained on the folder never saw). Problems with single cases are reported in the returned SampleReport; problems
    with the whole run (no cases, unreadable checkpoint) raise DataError or
    CheckpointMismatchError before anything is written.

    Under torchrun (WORLD_SIZE > 1) each process samples its share of the cases on its
    LOCAL_RANK's GPU (device "auto" or "cuda"; the CPU with gloo where there is none), and
    every process returns the report of the whole run once sampling.json holds every case."""
    distributed = Distributed(device)
    try:
        return _sample_cases(checkpoint, input_path, output_dir, settings, distributed, skip_existing=skip_existing,
                             montage=montage, progress=progress and distributed.is_main, subset=subset, log=log)
    finally:
        distributed.close()


def _sample_cases(checkpoint, input_path, output_dir, settings: SamplingSettings, distributed: Distributed, *,
                  skip_existing: bool, montage: bool, progress: bool, subset: str,
                  log: Callable[[str], None]) -> SampleReport:
    """sample_folder's work, for this process's share of the cases."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: exists and is not a folder")
    cases, report = find_cases(input_path, with_label=False)
    # An OUTPUT inside INPUT holds our own results, not a case.
    outputs = output_dir.resolve()
    cases = [c for c in cases if not c.folder.resolve().is_relative_to(outputs)]
    if subset != "all":
        cases = subset_cases(cases, subset)
        if not cases:
            raise DataError(f"{input_path}: its split has no {subset} case")
    problems = [p for p in report.errors if not (p.case_id == output_dir.name and outputs.is_relative_to(
        Path(input_path).expanduser().resolve()))]
    if not cases and not problems:
        raise DataError(f"{input_path}: holds no case besides the output folder {output_dir}")
    loaded = load_model(checkpoint, device=distributed.device)
    segmenter = Segmenter(loaded, settings, progress=progress)
    segmenter.sampler()  # checks the steps against the model's schedule before any work
    output_dir.mkdir(parents=True, exist_ok=True)

    outcomes = [CaseOutcome(p.case_id, "failed", p.message) for p in problems if distributed.is_main]
    for outcome in outcomes:
        log(f"{outcome.case_id}: FAILED: {outcome.message}")
    where = (f"{distributed.world_size} processes (rank 0: {loaded.device})" if distributed.enabled
             else loaded.device)
    if distributed.is_main:
        log(f"{len(cases)} case(s) to sample from {input_path} on {where} ({settings.steps} steps, "
            f"ensemble {settings.ensemble}, {settings.precision}{', tiled' if settings.tiled else ''}; volume grid "
            f"{segmenter.volume_shape}) into {output_dir}")
    records = []  # (outcome, seed) of this process's cases for sampling.json

    def record(outcome: CaseOutcome, seed: int | None) -> None:
        """Into sampling.json at once on rank 0 (its one writer), from the others at the end."""
        records.append((outcome, seed))
        if distributed.is_main:
            update_run_log(output_dir, settings, loaded.path, outcome, seed)

    for number, case in enumerate(cases, 1):
        if not distributed.owns(number - 1):
            continue
        prefix = f"[{number}/{len(cases)}] {case.case_id}"
        kinds = [k for k in OUTPUT_KINDS if montage or k != "montage"]
        if skip_existing and case_is_complete(output_dir, case.case_id, settings, loaded.path, kinds):
            outcomes.append(CaseOutcome(case.case_id, "skipped", "outputs exist"))
            log(f"{prefix}: skipped (outputs exist), written earlier by this checkpoint with these settings")
            continue
        start = time.perf_counter()
        seed = case_seed(settings.seed, case.case_id)
        try:
            prepared = segmenter.prepare(case)
            result = segmenter.segment(prepared, seed=seed)
            # no mixture of two runs; rank 0 alone writes sampling.json
            begin_case(output_dir, case.case_id, settings, loaded.path, kinds, write_record=distributed.is_main)
            written = write_case_outputs(output_dir, prepared, result, montage=montage)
        except (CaseError, FloatingPointError, MemoryError, ValueError, RuntimeError, OSError) as error:
            if isinstance(error, OSError) and error.errno in OUTPUT_DEVICE_ERRNOS:
                raise  # a full or read-only output folder stops the run: every case would fail the same way
            message = str(error).removeprefix(f"{case.case_id}: ").splitlines()[0]
            outcome = CaseOutcome(case.case_id, "failed", message, time.perf_counter() - start)
            log(f"{prefix}: FAILED: {message}")
        else:
            outcome = CaseOutcome(case.case_id, "ok", "", time.perf_counter() - start, written,
                                  list(prepared.warnings))
            mask, std = (prepared.meta.to_original(v.cpu().numpy()) for v in (result.mask, result.std))
            tumour = int(mask.sum())  # on the case's own grid, not the padding
            log(f"{prefix}: done in {outcome.seconds:.1f} s, {tumour} tumour voxels "
                f"(mean uncertainty in the tumour {float(std[mask].mean()) if tumour else 0.0:.3f})")
            for note in prepared.warnings:
                log(f"{prefix}: warning: {note}")
        outcomes.append(outcome)
        record(outcome, seed)
    if not distributed.enabled:
        return SampleReport(outcomes, output_dir)
    shares = distributed.gather((outcomes, records))
    if distributed.is_main:
        for _, others in shares[1:]:
            for outcome, seed in others:
                update_run_log(output_dir, settings, loaded.path, outcome, seed)
    distributed.barrier()  # sampling.json is complete before any process returns
    order = {case.case_id: i for i, case in enumerate(cases)}  # the INPUT's problems (-1) first
    everyone = sorted((o for share, _ in shares for o in share), key=lambda o: order.get(o.case_id, -1))
    return SampleReport(everyone, output_dir, distributed.is_main)
