"""`patchddm evaluate`: Dice and HD95 of a folder of predicted masks."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import EXIT_CASES_FAILED, EXIT_OK, InputError

NAME = "evaluate"
SUMMARY = "Dice and HD95 of predicted masks against the ground truth"
DESCRIPTION = ("Scores each prediction in PRED_DIR (<case>_mask.nii.gz as `patchddm sample` writes, or "
               "<case>.nii.gz) against its ground truth in GT_DIR (case folders with a *_seg.nii.gz, as BraTS "
               "ships, or flat <case>_seg.nii.gz files): Dice and HD95 (mm, voxel size from the ground truth's "
               "NIfTI header) of the whole tumour (label > 0). Prints a table with the mean, standard deviation "
               "and median and writes it as CSV.")


def add_arguments(parser) -> None:
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted masks")
    parser.add_argument("gt_dir", metavar="GT_DIR", help="folder of ground-truth segmentations")
    parser.add_argument("--csv", default=None, metavar="PATH",
                        help="where to write the CSV (default: PRED_DIR/evaluation.csv)")
    parser.add_argument("--baseline", action="store_true",
                        help="also score one threshold on the normalised FLAIR, fitted on the training part of "
                             "GT_DIR's split (GT_DIR must hold the cases' images), beside the model: a model "
                             "below it is too weak, a data set where it scores high is easy")


def run(args) -> int:
    from ..evaluation import evaluate_folders, format_table, write_csv

    csv_path = Path(args.csv).expanduser() if args.csv else Path(args.pred_dir) / "evaluation.csv"
    if csv_path.is_dir():  # refused before any work, and before anything is written
        raise InputError(f"--csv {args.csv}: is a folder; give the name of the CSV file to write")
    evaluation = evaluate_folders(args.pred_dir, args.gt_dir, progress=not args.quiet)
    print(format_table(evaluation))
    for warning in evaluation.warnings:
        print(f"WARNING: {warning}")
        print(f"patchddm evaluate: warning: {warning}", file=sys.stderr)
    if evaluation.truths_without_prediction:
        print(f"note: {len(evaluation.truths_without_prediction)} ground-truth case(s) have no prediction "
              f"(not scored): {', '.join(evaluation.truths_without_prediction[:10])}"
              + (" ..." if len(evaluation.truths_without_prediction) > 10 else ""))
    if evaluation.predictions_without_truth:
        print(f"note: {len(evaluation.predictions_without_truth)} prediction(s) have no ground truth (not scored): "
              f"{', '.join(evaluation.predictions_without_truth[:10])}")
    path = write_csv(evaluation, csv_path)
    print(f"CSV: {path}")
    if args.baseline:
        from ..baseline import baseline_for, format_comparison

        model = {s.case_id: s.dice for s in evaluation.scored}
        try:
            rule, baseline = baseline_for(args.gt_dir, list(model))
        except ValueError as error:
            raise InputError(f"--baseline: {error}") from None
        print(f"FLAIR baseline: one threshold ({rule.threshold:.2f}) on the normalised FLAIR, largest component, "
              "fitted on the training part of the split")
        print(format_comparison(model, baseline, rule.threshold))
    return EXIT_CASES_FAILED if evaluation.failed else EXIT_OK
