"""The `patchddm` command.

    patchddm train DATA_DIR OUT_DIR [...]        train a PatchDDM on BraTS-layout data
    patchddm sample CHECKPOINT INPUT OUTPUT      segment cases (mask, mean, uncertainty, montage)
    patchddm evaluate PRED_DIR GT_DIR            Dice and HD95 per case and summary
    patchddm sweep CHECKPOINT DATA_DIR OUT_DIR   Dice/HD95 vs sampling steps and ensemble size
    patchddm demo [--out DIR] [--quick]          phantoms -> train -> sample -> evaluate
    patchddm phantoms OUT_DIR                    synthetic BraTS-layout cases
    patchddm info                                versions, backends, devices
    patchddm import-checkpoint ORIGINAL OUT      convert an original PatchDDM checkpoint

Exit status: 0 success; 1 some cases failed (the others were processed and written);
2 usage or input error (bad path, unreadable or mismatching file; nothing was processed);
3 internal error (a bug: rerun with --traceback and report it); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import traceback
from pathlib import Path

from .precision import SHORT_NAMES, precision_argument

EXIT_OK, EXIT_CASES_FAILED, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_STATUS_HELP = """exit status:
  0    success
  1    some cases failed (reported; the other cases were processed and written)
  2    usage or input error (bad path, unreadable or mismatching file)
  3    internal error (please rerun with --traceback and report it)
  130  interrupted (Ctrl-C); files already written stay intact"""


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description on its own (indented lines are kept as they are), and
    adds an option's default to its help when it has a meaningful one."""

    def _fill_text(self, text, width, indent):
        lines = []
        for line in text.splitlines():
            if line.startswith("  ") or not line:
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) if isinstance(default, list) else ",".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _shape_arg(text: str) -> tuple[int, int, int]:
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("general")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--traceback", action="store_true",
                       help="on an error, show the full Python traceback instead of one line")
    return common


def _sampling_options(parser: argparse.ArgumentParser, *, steps_help: str, ensemble_help: str,
                      many: bool = False) -> None:
    group = parser.add_argument_group("sampling")
    if many:
        group.add_argument("--steps", type=_positive_int, nargs="+", default=[2, 5, 10, 20], help=steps_help)
        group.add_argument("--ensemble", type=_positive_int, nargs="+", default=[1, 3, 5], help=ensemble_help)
    else:
        group.add_argument("--steps", type=_positive_int, default=20, help=steps_help)
        group.add_argument("--ensemble", type=_positive_int, default=5, help=ensemble_help)
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the run; each case's seed is derived from it and the case id")
    group.add_argument("--precision", default="fp32", type=precision_argument,
                       metavar="{" + ",".join(SHORT_NAMES) + "}",
                       help="network precision (autocast); bf16 halves memory on recent GPUs")
    group.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    group.add_argument("--tiled", action="store_true",
                       help="run the network on overlapping tiles instead of the whole volume at once, for "
                            "volumes too large for the device's memory")
    group.add_argument("--tile", type=_shape_arg, default=None, metavar="N|X,Y,Z",
                       help="tile size with --tiled (default: the training patch, else 128)")
    group.add_argument("--volume", type=_shape_arg, default=None, metavar="N|X,Y,Z",
                       help="grid the cases are padded to (default: the training volume recorded in the checkpoint, "
                            "else 256); coordinates are normalised over it")
    group.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: the paper's deterministic DDIM)")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="patchddm", formatter_class=_Formatter,
        description="PatchDDM (3D diffusion models for brain-tumour segmentation), fast.\n"
                    "Run `patchddm demo` for a complete run on synthetic data, "
                    "`patchddm COMMAND --help` for a command's options.",
        epilog=EXIT_STATUS_HELP)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"patchddm_fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description, parents=[common],
                                   formatter_class=_Formatter, epilog=EXIT_STATUS_HELP)

    # train -----------------------------------------------------------------------------------
    train = command("train", "train a PatchDDM on BraTS-layout data",
                    "Trains PatchDDM on 3-D patches of the cases in DATA_DIR (BraTS2020's "
                    "MICCAI_BraTS2020_TrainingData, or phantoms), splitting them into train / validation / test "
                    "(the paper's 295 / 37 / 37 for BraTS2020), and writes checkpoints and logs to OUT_DIR.")
    _add_train_arguments(train)

    # sample ----------------------------------------------------------------------------------
    sample = command("sample", "segment cases with a trained model",
                     "Segments every case in INPUT (one case folder, or a folder of case folders, each holding "
                     "t1, t1ce, t2 and flair NIfTI files) with an ensemble of diffusion samples of the whole "
                     "volume, and writes into OUTPUT, on each case's original grid with its affine and header:\n"
                     "  <case>_mask.nii.gz         whole-tumour mask (uint8): ensemble mean > 0.5\n"
                     "  <case>_mean.nii.gz         ensemble mean (float32)\n"
                     "  <case>_uncertainty.nii.gz  per-voxel standard deviation across the ensemble\n"
                     "  <case>_montage.png         axial, coronal, sagittal slices through the tumour\n"
                     "  sampling.json              each case's settings, seed, time and status\n"
                     "A case that fails is reported and the others go on.")
    sample.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint from `patchddm train` or "
                        "`patchddm import-checkpoint`")
    sample.add_argument("input", metavar="INPUT", help="a case folder, or a folder of case folders")
    sample.add_argument("output", metavar="OUTPUT", help="folder for the results (created if missing)")
    _sampling_options(sample, steps_help="DDIM sampling steps (the paper: 20 come close to 1000)",
                      ensemble_help="samples per case, averaged into the mask; their spread is the uncertainty")
    sample.add_argument("--skip-existing", action="store_true",
                        help="skip cases whose outputs are all in OUTPUT already (to resume an interrupted run)")
    sample.add_argument("--no-montage", action="store_true", help="do not draw the PNG montages")

    # evaluate --------------------------------------------------------------------------------
    evaluate = command("evaluate", "Dice and HD95 of predicted masks against the ground truth",
                       "Scores each prediction in PRED_DIR (<case>_mask.nii.gz as `patchddm sample` writes, or "
                       "<case>.nii.gz) against its ground truth in GT_DIR (case folders with a *_seg.nii.gz, as "
                       "BraTS ships, or flat <case>_seg.nii.gz files): Dice and HD95 (mm, voxel size from the "
                       "ground truth's NIfTI header) of the whole tumour (label > 0). Prints a table with the "
                       "mean, standard deviation and median and writes it as CSV.")
    evaluate.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted masks")
    evaluate.add_argument("gt_dir", metavar="GT_DIR", help="folder of ground-truth segmentations")
    evaluate.add_argument("--csv", default=None, metavar="PATH",
                          help="where to write the CSV (default: PRED_DIR/evaluation.csv)")

    # sweep -----------------------------------------------------------------------------------
    sweep = command("sweep", "Dice/HD95 against sampling steps and ensemble size (the paper's Figure 5)",
                    "Samples every case of DATA_DIR (with segmentations) at each number of --steps with the "
                    "largest --ensemble, scores the ensembles of every size (the first n members), and writes "
                    "OUT_DIR/sweep_cases.csv, sweep_summary.csv and sweep.png (Dice and HD95 against steps, one "
                    "line per ensemble size).\n"
                    "  e.g. patchddm sweep last.pt BraTS2020_TrainingData sweep/ --subset test --steps 3 10 20 50 "
                    "--ensemble 1 5 15")
    sweep.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint from `patchddm train`")
    sweep.add_argument("data_dir", metavar="DATA_DIR", help="a folder of cases with segmentations")
    sweep.add_argument("out_dir", metavar="OUT_DIR", help="folder for the CSVs and the plot")
    _sampling_options(sweep, steps_help="step counts to try", ensemble_help="ensemble sizes to score", many=True)
    sweep.add_argument("--subset", default="all", choices=["all", "train", "validation", "test"],
                       help="which part of the data split to use (BraTS2020: the paper's split; else 80/10/10 by "
                            "case number)")
    sweep.add_argument("--max-cases", type=_positive_int, default=None, help="use at most this many cases")

    # demo ------------------------------------------------------------------------------------
    demo = command("demo", "phantoms -> train -> sample -> evaluate, on this machine",
                   "Writes synthetic brain-tumour phantoms, trains a small PatchDDM on patches of the training "
                   "cases, samples the whole held-out volumes with a small ensemble, evaluates them and writes "
                   "everything (data, checkpoint, predictions, montages, scores) under --out. The last line "
                   "printed is `mean Dice <value>`.")
    demo.add_argument("--out", default="patchddm_demo", help="folder for everything the demo writes")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test; low Dice)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    # phantoms --------------------------------------------------------------------------------
    phantoms = command("phantoms", "write synthetic BraTS-layout cases",
                       "Writes N synthetic cases (head, brain, ventricles, one or two gliomas with necrosis, "
                       "enhancing rim and oedema; t1, t1ce, t2, flair and seg) in BraTS2020's layout: "
                       "OUT_DIR/Phantom_NNN/Phantom_NNN_{t1,t1ce,t2,flair,seg}.nii.gz. Each case depends only on "
                       "--seed and its number.")
    phantoms.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the cases into")
    phantoms.add_argument("--n", type=_positive_int, default=8, help="number of cases")
    phantoms.add_argument("--size", type=_shape_arg, default=(64, 64, 64), metavar="N|X,Y,Z",
                          help="grid size (at least 16 per axis; BraTS is 240,240,155)")
    phantoms.add_argument("--seed", type=int, default=0, help="seed of the collection")
    phantoms.add_argument("--layout", default="brats", choices=["brats", "original"],
                          help="folder layout: BraTS2020's, or the original PatchDDM code's")

    # info ------------------------------------------------------------------------------------
    command("info", "versions, compiled backends and devices",
            "Prints the versions of patchddm_fast, Python and PyTorch, whether the compiled extension and "
            "Triton load, which backend runs each fast op on each device, and the devices visible.")

    # import-checkpoint -----------------------------------------------------------------------
    convert = command("import-checkpoint", "convert an original PatchDDM checkpoint",
                      "Reads a checkpoint of the original PatchDDM code (a state_dict saved by its training "
                      "loop, e.g. savedmodel100000.pt; .pt, .pth or .npz), infers the network from its tensor "
                      "shapes, and writes it as a patchddm_fast checkpoint that `patchddm sample` reads.")
    convert.add_argument("original", metavar="ORIGINAL", help="the original checkpoint")
    convert.add_argument("out", metavar="OUT", help="the patchddm_fast checkpoint to write")
    convert.add_argument("--groups", type=_positive_int, default=None,
                         help="GroupNorm groups (not visible in the weights; default: model channels, the paper's)")
    convert.add_argument("--volume", type=_shape_arg, default=(256, 256, 256), metavar="N|X,Y,Z",
                         help="the volume grid the model was trained on (the paper: 256)")
    convert.add_argument("--patch", type=_shape_arg, default=(128, 128, 128), metavar="N|X,Y,Z",
                         help="the patch size it was trained on (the paper: 128)")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


# -- train ------------------------------------------------------------------------------------

def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_train_arguments

    add_train_arguments(parser)


def _run_train(args) -> int:
    from .device import resolve_device
    from .train import config_from_args, train

    try:
        config = config_from_args(args)
    except ValueError as error:  # every invalid setting, one per line
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        raise _InputError("invalid training settings: " + "; ".join(problems)) from None
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


# -- sample -----------------------------------------------------------------------------------

def _settings(args, **overrides):
    from .inference import SamplingSettings

    values = dict(steps=args.steps, ensemble=args.ensemble, seed=args.seed, precision=args.precision, eta=args.eta,
                  tiled=args.tiled, tile_shape=args.tile, volume_shape=args.volume)
    values.update(overrides)
    return SamplingSettings(**values)


def _run_sample(args) -> int:
    from .inference import sample_folder

    report = sample_folder(args.checkpoint, args.input, args.output, _settings(args), device=args.device,
                           skip_existing=args.skip_existing, montage=not args.no_montage, progress=not args.quiet)
    done, failed = len(report.succeeded), report.failed
    skipped = len(report.outcomes) - done - len(failed)
    print(f"{done} case(s) written to {report.output_dir}"
          + (f", {skipped} skipped" if skipped else "") + (f", {len(failed)} FAILED:" if failed else ""))
    for outcome in failed:
        print(f"  {outcome.case_id}: {outcome.message}")
    return EXIT_CASES_FAILED if failed else EXIT_OK


# -- evaluate ---------------------------------------------------------------------------------

def _run_evaluate(args) -> int:
    from .evaluation import evaluate_folders, format_table, write_csv

    evaluation = evaluate_folders(args.pred_dir, args.gt_dir, progress=not args.quiet)
    print(format_table(evaluation))
    if evaluation.truths_without_prediction:
        print(f"note: {len(evaluation.truths_without_prediction)} ground-truth case(s) have no prediction "
              f"(not scored): {', '.join(evaluation.truths_without_prediction[:10])}"
              + (" ..." if len(evaluation.truths_without_prediction) > 10 else ""))
    if evaluation.predictions_without_truth:
        print(f"note: {len(evaluation.predictions_without_truth)} prediction(s) have no ground truth (not scored): "
              f"{', '.join(evaluation.predictions_without_truth[:10])}")
    path = write_csv(evaluation, args.csv or Path(args.pred_dir) / "evaluation.csv")
    print(f"CSV: {path}")
    return EXIT_CASES_FAILED if evaluation.failed else EXIT_OK


# -- sweep ------------------------------------------------------------------------------------

def _run_sweep(args) -> int:
    from .data import find_cases, split_cases
    from .device import resolve_device
    from .inference import Segmenter, load_model
    from .sweep import format_sweep, run_sweep, summarise_sweep, write_sweep

    cases, report = find_cases(args.data_dir, with_label=True)
    failed = {p.case_id: p.message for p in report.errors}
    if args.subset != "all":
        cases = split_cases(cases)[args.subset]
    cases = cases[:args.max_cases] if args.max_cases else cases
    if not cases:
        raise _InputError(f"{args.data_dir}: no usable case with a segmentation in subset {args.subset!r}")
    settings = _settings(args, steps=max(args.steps), ensemble=max(args.ensemble))
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
    written = write_sweep(args.out_dir, scores, title=f"{Path(args.checkpoint).name} on {len(cases)} case(s)")
    print(format_sweep(summarise_sweep(scores)))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return EXIT_CASES_FAILED if failed else EXIT_OK


# -- demo, phantoms, info, import-checkpoint --------------------------------------------------

def _run_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, quick=args.quick, device=args.device, progress=not args.quiet)
    if result.interrupted:
        return EXIT_INTERRUPTED
    print(f"mean Dice {result.mean_dice:.4f}")
    return EXIT_CASES_FAILED if result.failed_cases else EXIT_OK


def _run_phantoms(args) -> int:
    from .data import write_phantoms

    if min(args.size) < 16:
        raise _InputError(f"--size {args.size}: phantoms need at least 16 voxels per axis")
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise _InputError(f"{out}: exists and is not a folder")
    start = time.perf_counter()
    written = write_phantoms(out, n=args.n, shape=args.size, seed=args.seed, layout=args.layout,
                             progress=not args.quiet)
    print(f"{len(written)} phantom case(s) of {args.size[0]}x{args.size[1]}x{args.size[2]} written to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _run_info(args) -> int:
    from . import info

    print(info())
    return EXIT_OK


def _run_import_checkpoint(args) -> int:
    import os

    from .checkpoint_info import CheckpointInfo
    from .nn import load_original_checkpoint, save_checkpoint

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise _InputError(f"{out}: is a folder; give the file name to write")
    if out.exists() and not args.force:
        raise _InputError(f"{out}: exists already (pass --force to overwrite it)")
    if not out.parent.is_dir():
        raise _InputError(f"{out.parent}: no such folder to write {out.name} into")
    if not os.path.isfile(args.original):
        raise _InputError(f"{args.original}: no such checkpoint file")
    model = load_original_checkpoint(args.original, groups=args.groups)
    info = CheckpointInfo(volume_shape=args.volume, patch_shape=args.patch,  # PatchDDM's schedule
                          image_channels=model.config.in_channels - 4, source=str(Path(args.original).resolve()))
    save_checkpoint(model, out, **info.to_dict())
    parameters = sum(p.numel() for p in model.parameters())
    print(f"imported {args.original}: {model.config} ({parameters:,} parameters)")
    print(f"written to {out}")
    return EXIT_OK


_RUNNERS = {"train": _run_train, "sample": _run_sample, "evaluate": _run_evaluate, "sweep": _run_sweep,
            "demo": _run_demo, "phantoms": _run_phantoms, "info": _run_info,
            "import-checkpoint": _run_import_checkpoint}


# -- errors -----------------------------------------------------------------------------------

class _InputError(Exception):
    """A problem with the command's input that the user can fix."""


def _input_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .diffusion import VolumeTooLargeError
    from .nn import CheckpointMismatchError

    return (_InputError, DataError, CheckpointMismatchError, VolumeTooLargeError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = lines[0].rstrip(":")
    counts = [f"{len(v)} {label}" for attribute, label in (("missing", "missing"), ("unexpected", "unexpected"),
                                                           ("mismatched", "mis-shaped"))
              if (v := getattr(error, attribute, None))]
    if counts:
        message += f" ({', '.join(counts)} tensor(s); --traceback lists them)"
    elif len(lines) > 1:
        message += " (--traceback shows the rest)"
    return message


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default sys.argv[1:]) and returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error (argparse prints it)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_INPUT
    name = f"patchddm {args.command}"
    try:
        return _RUNNERS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; files already written are complete and kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _input_errors() as error:
        if args.traceback:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as error:  # a bug: say so in one line unless asked for the traceback
        if args.traceback:
            traceback.print_exc()
        print(f"{name}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(rerun with --traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
