"""What several commands share: exit statuses, argument types, the sampling options and the
error for input the user can fix."""

from __future__ import annotations

import argparse

from ..diffusion.scheduler_names import SCHEDULER_NAMES
from ..precision import SHORT_NAMES, precision_argument

EXIT_OK, EXIT_CASES_FAILED, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class InputError(Exception):
    """A problem with the command's input that the user can fix."""


def shape_arg(text: str) -> tuple[int, int, int]:
    """An int (a cube) or three comma-separated ints."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (N, or X,Y,Z)") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (N, or X,Y,Z, positive)")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


MAX_SEED = 2**63 - 1  # seeds go through numpy's and torch's 64-bit generators


def seed_arg(text: str) -> int:
    """A seed: an integer in [0, 2^63 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not a seed: seeds are integers from 0 to 2^63 - 1")
    return value


def add_sampling_options(parser: argparse.ArgumentParser, *, steps_help: str, ensemble_help: str,
                         many: bool = False) -> None:
    """The options of `patchddm sample` and `patchddm sweep` (many: lists of steps and sizes)."""
    group = parser.add_argument_group("sampling")
    if many:
        group.add_argument("--steps", type=positive_int, nargs="+", default=[2, 5, 10, 20], help=steps_help)
        group.add_argument("--ensemble", type=positive_int, nargs="+", default=[1, 3, 5], help=ensemble_help)
    else:
        group.add_argument("--steps", type=positive_int, default=20, help=steps_help)
        group.add_argument("--ensemble", type=positive_int, default=5, help=ensemble_help)
    group.add_argument("--seed", type=seed_arg, default=0,
                       help="seed of the run; each case's seed is derived from it and the case id")
    group.add_argument("--precision", default="fp32", type=precision_argument,
                       metavar="{" + ",".join(SHORT_NAMES) + "}",
                       help="network precision (autocast); bf16 halves memory on recent GPUs")
    group.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    group.add_argument("--tiled", action="store_true",
                       help="run the network on overlapping tiles instead of the whole volume at once, for "
                            "volumes too large for the device's memory")
    group.add_argument("--tile", type=shape_arg, default=None, metavar="N|X,Y,Z",
                       help="tile size with --tiled (default: the training patch, else 128)")
    group.add_argument("--volume", type=shape_arg, default=None, metavar="N|X,Y,Z",
                       help="grid the cases are padded to (default: the training volume recorded in the checkpoint, "
                            "else 256); coordinates are normalised over it")
    group.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: the paper's deterministic DDIM)")
    group.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim",
                       help="ddim (the paper's), ddpm, or dpmsolver++ (DPM-Solver++(2M): as good in fewer steps)")


def add_subset_option(parser: argparse.ArgumentParser) -> None:
    """--subset of `patchddm sample` and `patchddm sweep`: one part of the folder's split."""
    from ..data.split import SUBSETS

    parser.add_argument("--subset", default="all", choices=SUBSETS,
                        help="only this part of the folder's split, as `patchddm train` splits it (BraTS2020: "
                             "the paper's split; else 80/10/10 by case number; held-out: validation and test, "
                             "never trained on; default: all)")


def sampling_settings(args, **overrides):
    """The SamplingSettings of the parsed sampling options."""
    from ..inference import SamplingSettings

    values = dict(steps=args.steps, ensemble=args.ensemble, seed=args.seed, precision=args.precision, eta=args.eta,
                  scheduler=args.scheduler, tiled=args.tiled, tile_shape=args.tile, volume_shape=args.volume)
    values.update(overrides)
    return SamplingSettings(**values)
