"""`patchddm sample`: segment every case of a folder with a trained model."""

from __future__ import annotations

from ._common import EXIT_CASES_FAILED, EXIT_OK, add_sampling_options, add_subset_option, sampling_settings

NAME = "sample"
SUMMARY = "segment cases with a trained model"
DESCRIPTION = ("Segments every case in INPUT (one case folder, or a folder of case folders, each holding t1, t1ce, "
               "t2 and flair NIfTI files) with an ensemble of diffusion samples of the whole volume, and writes "
               "into OUTPUT, on each case's original grid with its affine and header:\n"
               "  <case>_mask.nii.gz         whole-tumour mask (uint8): ensemble mean > 0.5\n"
               "  <case>_mean.nii.gz         ensemble mean (float32)\n"
               "  <case>_uncertainty.nii.gz  per-voxel standard deviation across the ensemble\n"
               "  <case>_montage.png         axial, coronal, sagittal slices through the tumour\n"
               "  sampling.json              each case's settings, seed, time and status\n"
               "A case that fails is reported and the others go on.\n"
               "Under `torchrun --nproc_per_node=N -m patchddm_fast sample ...` the cases are shared out across N "
               "processes, one GPU each (the CPU with gloo where there is none), with the same outputs as one "
               "process; rank 0 writes sampling.json and reports the run.")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint from `patchddm train` or "
                        "`patchddm import-checkpoint`")
    parser.add_argument("input", metavar="INPUT", help="a case folder, or a folder of case folders")
    parser.add_argument("output", metavar="OUTPUT", help="folder for the results (created if missing)")
    add_sampling_options(parser, steps_help="DDIM sampling steps (the paper: 20 come close to 1000)",
                         ensemble_help="samples per case, averaged into the mask; their spread is the uncertainty")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip cases whose outputs are all in OUTPUT already (to resume an interrupted run)")
    parser.add_argument("--no-montage", action="store_true", help="do not draw the PNG montages")
    add_subset_option(parser)


def run(args) -> int:
    from ..inference import sample_folder

    report = sample_folder(args.checkpoint, args.input, args.output, sampling_settings(args), device=args.device,
                           skip_existing=args.skip_existing, montage=not args.no_montage, progress=not args.quiet,
                           subset=args.subset)
    if not report.is_main:  # under torchrun rank 0 reports the whole run and carries its exit status
        return EXIT_OK
    done, failed = len(report.succeeded), report.failed
    skipped = len(report.outcomes) - done - len(failed)
    print(f"{done} case(s) written to {report.output_dir}"
          + (f", {skipped} skipped" if skipped else "") + (f", {len(failed)} FAILED:" if failed else ""))
    for outcome in failed:
        print(f"  {outcome.case_id}: {outcome.message}")
    return EXIT_CASES_FAILED if failed else EXIT_OK
