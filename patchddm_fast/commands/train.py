"""`patchddm train`: its options are TrainConfig's (patchddm_fast.train.add_train_arguments)."""

from __future__ import annotations

import sys

from ._common import EXIT_INTERRUPTED, EXIT_OK, InputError

NAME = "train"
SUMMARY = "train a PatchDDM on BraTS-layout data"
DESCRIPTION = ("Trains PatchDDM on 3-D patches of the cases in DATA_DIR (BraTS2020's MICCAI_BraTS2020_TrainingData, "
               "or phantoms), splitting them into train / validation / test (the paper's 295 / 37 / 37 for "
               "BraTS2020), and writes checkpoints and logs to OUT_DIR.")


def add_arguments(parser) -> None:
    from ..train import add_train_arguments

    add_train_arguments(parser)


def run(args) -> int:
    from ..device import resolve_device
    from ..train import config_from_args, train

    try:
        config = config_from_args(args)
    except ValueError as error:  # every invalid setting, one per line
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        raise InputError("invalid training settings: " + "; ".join(problems)) from None
    resolve_device(config.device)  # a clear message for a device that is not there
    result = train(config, progress=not args.quiet)
    print(f"checkpoint: {result.checkpoint}")
    print(f"steps: {result.steps}"
          + (f", last loss: {result.last_loss:.5f}" if result.last_loss is not None else "")
          + (f", validation Dice: {result.validation_dice:.4f}" if result.validation_dice is not None else "")
          + f", {result.seconds / 60:.1f} min")
    if result.interrupted:
        print("training was interrupted; continue it with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
