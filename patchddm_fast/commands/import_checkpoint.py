"""`patchddm import-checkpoint`: an original PatchDDM checkpoint as a patchddm_fast one."""

from __future__ import annotations

import os
from pathlib import Path

from ._common import EXIT_OK, InputError, positive_int, shape_arg

NAME = "import-checkpoint"
SUMMARY = "convert an original PatchDDM checkpoint"
DESCRIPTION = ("Reads a checkpoint of the original PatchDDM code (a state_dict saved by its training loop, e.g. "
               "savedmodel100000.pt; .pt, .pth or .npz), infers the network from its tensor shapes, and writes it "
               "as a patchddm_fast checkpoint that `patchddm sample` reads.")


def add_arguments(parser) -> None:
    parser.add_argument("original", metavar="ORIGINAL", help="the original checkpoint")
    parser.add_argument("out", metavar="OUT", help="the patchddm_fast checkpoint to write")
    parser.add_argument("--groups", type=positive_int, default=None,
                        help="GroupNorm groups (not visible in the weights; default: model channels, the paper's)")
    parser.add_argument("--volume", type=shape_arg, default=(256, 256, 256), metavar="N|X,Y,Z",
                        help="the volume grid the model was trained on (the paper: 256)")
    parser.add_argument("--patch", type=shape_arg, default=(128, 128, 128), metavar="N|X,Y,Z",
                        help="the patch size it was trained on (the paper: 128)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args) -> int:
    from ..checkpoint_info import CheckpointInfo
    from ..nn import load_original_checkpoint, save_checkpoint

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give the file name to write")
    if out.exists() and not args.force:
        raise InputError(f"{out}: exists already (pass --force to overwrite it)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder to write {out.name} into")
    if not os.path.isfile(args.original):
        raise InputError(f"{args.original}: no such checkpoint file")
    model = load_original_checkpoint(args.original, groups=args.groups)
    info = CheckpointInfo(volume_shape=args.volume, patch_shape=args.patch,  # PatchDDM's schedule
                          image_channels=model.config.in_channels - 4, source=str(Path(args.original).resolve()))
    save_checkpoint(model, out, **info.to_dict())
    parameters = sum(p.numel() for p in model.parameters())
    print(f"imported {args.original}: {model.config} ({parameters:,} parameters)")
    print(f"written to {out}")
    return EXIT_OK
