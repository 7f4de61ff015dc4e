"""Ctrl-C while `patchddm` is still starting (importing torch takes seconds): exit 130 with one
line instead of a traceback from the middle of an import. Library users keep their
KeyboardInterrupt."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

EXIT_INTERRUPTED = 130


def started_as_command() -> bool:
    """Whether this process is the `patchddm` command (the console script, or
    `python -m patchddm_fast`), rather than a program that imports patchddm_fast."""
    if os.path.basename(sys.argv[0]) in ("patchddm", "patchddm.exe"):
        return True
    original = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b in ("patchddm_fast", "patchddm_fast.cli", "patchddm_fast.__main__")
               for a, b in zip(original, original[1:]))


@contextmanager
def interrupt_exits_quietly():
    """Turns a KeyboardInterrupt into a one-line message and SystemExit(130) when this process is
    the command; elsewhere the interrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_command():
            raise
        print("\npatchddm: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
