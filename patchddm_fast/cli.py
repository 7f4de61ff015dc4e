"""The `patchddm` command.

    patchddm train DATA_DIR OUT_DIR [...]        train a PatchDDM on BraTS-layout data
    patchddm sample CHECKPOINT INPUT OUTPUT      segment cases (mask, mean, uncertainty, montage)
    patchddm evaluate PRED_DIR GT_DIR            Dice and HD95 per case and summary
    patchddm sweep CHECKPOINT DATA_DIR OUT_DIR   Dice/HD95 vs sampling steps and ensemble size
    patchddm demo [--out DIR] [--quick]          phantoms -> train -> sample -> evaluate
    patchddm phantoms OUT_DIR                    synthetic BraTS-layout cases
    patchddm info                                versions, backends, devices
    patchddm import-checkpoint ORIGINAL OUT      convert an original PatchDDM checkpoint

Each command's options and code are in patchddm_fast.commands; this module builds the parser
and turns errors into exit statuses: 0 success; 1 some cases failed (the others were processed
and written); 2 usage or input error (bad path, unreadable or mismatching file; nothing was
processed; also an environment the user can fix: a read-only or full output folder, a run that
diverges); 3 internal error (a bug: rerun with --traceback and report it); 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import sys
import textwrap
import traceback

from ._interrupt import interrupt_exits_quietly

with interrupt_exits_quietly():  # Ctrl-C while the command is still importing: one line, exit 130
    from .commands import COMMANDS
    from .commands._common import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, InputError

EXIT_STATUS_HELP = """exit status:
  0    success
  1    some cases failed (reported; the other cases were processed and written)
  2    usage or input error (bad path, unreadable or mismatching file, read-only or full
       output folder, a training run that diverged)
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


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("general")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--traceback", action="store_true",
                       help="on an error, show the full Python traceback instead of one line")
    return common


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
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.SUMMARY, description=command.DESCRIPTION,
                                  parents=[common], formatter_class=_Formatter, epilog=EXIT_STATUS_HELP)
        command.add_arguments(sub)
    return parser


_RUNNERS = {command.NAME: command.run for command in COMMANDS}


# -- errors -----------------------------------------------------------------------------------

def _input_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .diffusion import VolumeTooLargeError
    from .nn import CheckpointMismatchError

    return (InputError, DataError, CheckpointMismatchError, VolumeTooLargeError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


# Errors of the machine the user can fix (no space, a read-only folder, no permission, a quota):
# not bugs, so exit 2 with the reason.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                      errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                      errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def _environment_message(error: OSError) -> str:
    """One line naming the file and the reason, without Python's "[Errno N]" prefix."""
    reason = ENVIRONMENT_ERRNOS[error.errno]
    text = error.strerror or ""
    if error.filename is not None:
        writing = error.errno not in (errno.EACCES, errno.EPERM)  # those may come from reading too
        return f"{'cannot write ' if writing else ''}{error.filename}: {reason}"
    if text and text.lower() != reason and not text.startswith(("No space", "Read-only", "Permission")):
        return text.splitlines()[0]  # our own messages: "cannot write PATH: no space left on the device"
    return reason  # no file named: the reason alone


DIVERGED_ADVICE = "the run diverged: lower --lr, keep --grad-clip on, or train in fp32"


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


def _input_error(name: str, args, message: str) -> int:
    if args.traceback:
        traceback.print_exc()
    print(f"{name}: error: {message}", file=sys.stderr)
    return EXIT_INPUT


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default sys.argv[1:]) and returns the exit status."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version, or a usage error (argparse prints it)
            return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_INPUT
    except KeyboardInterrupt:
        print("\npatchddm: interrupted while starting; nothing was done", file=sys.stderr)
        return EXIT_INTERRUPTED
    name = f"patchddm {args.command}"
    try:
        return _RUNNERS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; files already written are complete and kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        if error.errno in ENVIRONMENT_ERRNOS:
            return _input_error(name, args, _environment_message(error))
        if isinstance(error, _input_errors()):
            return _input_error(name, args, _one_line(error))
        return _internal_error(name, args, error)
    except _input_errors() as error:
        return _input_error(name, args, _one_line(error))
    except FloatingPointError as error:  # non-finite losses or gradients: the settings, not a bug
        message = _one_line(error)
        advice = "keep --grad-clip on" if "lr" in message else DIVERGED_ADVICE  # the trainer advises on lr itself
        return _input_error(name, args, f"{message}; {advice}")
    except Exception as error:
        return _internal_error(name, args, error)


def _internal_error(name: str, args, error: BaseException) -> int:
    """A bug: say so in one line unless asked for the traceback."""
    if args.traceback:
        traceback.print_exc()
    print(f"{name}: internal error: {type(error).__name__}: {_one_line(error)} "
          "(rerun with --traceback and report it)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
