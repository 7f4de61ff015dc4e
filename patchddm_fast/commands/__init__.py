"""The commands of `patchddm`, one module each: NAME, SUMMARY, DESCRIPTION, add_arguments(parser)
and run(args) -> exit status. patchddm_fast.cli assembles them into one parser."""

from . import demo, evaluate, import_checkpoint, info, phantoms, sample, sweep, train

COMMANDS = (train, sample, evaluate, sweep, demo, phantoms, info, import_checkpoint)  # in --help's order
