"""`patchddm sweep`: Dice/HD95 against sampling steps and ensemble size (the paper's Figure 5)."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import (EXIT_CASES_FAILED, EXIT_OK, InputError, add_sampling_options, add_subset_option, positive_int,
                      sampling_settings)

NAME = "sweep"
SUMMARY = "Dice/HD95 against sampling steps and ensemble size (the paper's Figure 5)"
DESCRIPTION = ("Samples every case of DATA_DIR (with segmentations) at each number of --steps with the largest "
               "--ensemble, scores the ensembles of every size (the first n members), and writes "
               "OUT_DIR/sweep_cases.csv, sweep_summary.csv and sweep.png (Dice and HD95 against steps, one line "
               "per ensemble size).\n"
               "  e.g. patchddm sweep last.pt BraTS2020_TrainingData sweep/ --subset test --steps 3 10 20 50 "
               "--ensemble 1 5 15")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint from `patchddm train`")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="a folder of cases with segmentations")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the CSVs and the plot")
    add_sampling_options(parser, steps_help="step counts to try", ensemble_help="ensemble sizes to score", many=True)
    add_subset_option(parser)
    parser.add_argument("--max-cases", type=positive_int, default=None, help="use at most this many cases")


def run(args) -> int:
    from ..data import find_cases, subset_cases
    from ..device import resolve_device
    from ..inference import Segmenter, load_model
    from ..sweep import format_sweep, run_sweep, summarise_sweep, write_sweep

    cases, report = find_cases(args.data_dir, with_label=True)
    failed = {p.case_id: p.message for p in report.errors}
    cases = subset_cases(cases, args.subset)
    cases = cases[:args.max_cases] if args.max_cases else cases
    if not cases:
        raise InputError(f"{args.data_dir}: no usable case with a segmentation in subset {args.subset!r}")
    settings = sampling_settings(args, steps=max(args.steps), ensemble=max(args.ensemble))
    segmenter = Segmenter(load_model(args.checkpoint, device=resolve_device(args.device)), settings,
                          progress=not args.quiet)
    for steps in args.steps:
        segmenter.sampler(steps, max(args.ensemble))  # checks every step count before any work
    print(f"sweep over {len(cases)} case(s): steps {sorted(set(args.steps))}, ensembles {sorted(set(args.ensemble))}")
    scores, case_failures = run_sweep(segmenter, cases, args.steps, args.ensemble, seed=args.seed)
    failed.update(case_failures)
    if not scores:
        print(f"every case failed: {failed}", file=sys.stderr)
        return EXIT_CASES_FAILED
    written = write_sweep(args.out_dir, scores, title=f"{Path(args.checkpoint).name} on {len(cases)} case(s)",
                          scheduler=args.scheduler)
    print(format_sweep(summarise_sweep(scores)))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return EXIT_CASES_FAILED if failed else EXIT_OK
