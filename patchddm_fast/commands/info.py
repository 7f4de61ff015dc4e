"""`patchddm info`: versions, compiled backends and devices."""

from __future__ import annotations

from ._common import EXIT_OK

NAME = "info"
SUMMARY = "versions, compiled backends and devices"
DESCRIPTION = ("Prints the versions of patchddm_fast, Python and PyTorch, whether the compiled extension and Triton "
               "load, which backend runs each fast op on each device, and the devices visible.")


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from .. import info

    print(info())
    return EXIT_OK
