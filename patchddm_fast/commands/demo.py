"""`patchddm demo`: phantoms -> train -> sample -> evaluate (patchddm_fast.demo)."""

from __future__ import annotations

from ._common import EXIT_CASES_FAILED, EXIT_INTERRUPTED, EXIT_OK

NAME = "demo"
SUMMARY = "phantoms -> train -> sample -> evaluate, on this machine"
DESCRIPTION = ("Writes synthetic brain-tumour phantoms, trains a small PatchDDM on patches of the training cases, "
               "samples the whole held-out volumes with a small ensemble, evaluates them and writes everything "
               "(data, checkpoint, predictions, montages, scores) under --out. The last line printed is "
               "`mean Dice <value>`.")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="patchddm_demo", help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test; low Dice)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args) -> int:
    from ..demo import run_demo

    result = run_demo(args.out, quick=args.quick, device=args.device, progress=not args.quiet)
    if result.interrupted:
        return EXIT_INTERRUPTED
    print(f"mean Dice {result.mean_dice:.4f}")
    return EXIT_CASES_FAILED if result.failed_cases else EXIT_OK
