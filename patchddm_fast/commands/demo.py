"""`patchddm demo`: phantoms -> train -> sample -> evaluate (patchddm_fast.demo)."""

from __future__ import annotations

from ._common import EXIT_CASES_FAILED, EXIT_INTERRUPTED, EXIT_OK

NAME = "demo"
SUMMARY = "phantoms -> train -> sample -> evaluate, on this machine"
DESCRIPTION = ("Writes synthetic brain-tumour phantoms (or takes your BraTS-layout folder, --data), trains a small "
               "PatchDDM on patches of the training cases of the split, samples the whole held-out volumes with a "
               "small ensemble, scores them beside one threshold on the FLAIR fitted on the training cases, and "
               "writes everything (checkpoint, split, predictions, montages, scores) under --out. Precision and "
               "memory layout are the device's fastest (bfloat16 where the hardware has it). The last line "
               "printed is `mean Dice <value>`.")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="patchddm_demo", help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test; low Dice)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a BraTS-layout folder of cases with segmentations to run the recipe on instead of "
                             "phantoms: trains on its training part, scores its held-out part")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args) -> int:
    from ..demo import run_demo

    result = run_demo(args.out, quick=args.quick, device=args.device, data=args.data, progress=not args.quiet)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.baseline:
        print(f"FLAIR threshold baseline on the same cases: mean Dice "
              f"{sum(result.baseline.values()) / len(result.baseline):.4f}")
    print(f"mean Dice {result.mean_dice:.4f}")
    return EXIT_CASES_FAILED if result.failed_cases else EXIT_OK
