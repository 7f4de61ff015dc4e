"""`patchddm phantoms`: synthetic cases in BraTS's layout."""

from __future__ import annotations

import time
from pathlib import Path

from ._common import EXIT_OK, InputError, positive_int, seed_arg, shape_arg

NAME = "phantoms"
SUMMARY = "write synthetic BraTS-layout cases"
DESCRIPTION = ("Writes N synthetic cases (head, brain, ventricles, one or two gliomas with necrosis, enhancing rim "
               "and oedema; t1, t1ce, t2, flair and seg) in BraTS2020's layout: "
               "OUT_DIR/Phantom_NNN/Phantom_NNN_{t1,t1ce,t2,flair,seg}.nii.gz. Each case depends only on --seed "
               "and its number.")


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the cases into")
    parser.add_argument("--n", type=positive_int, default=8, help="number of cases")
    parser.add_argument("--size", type=shape_arg, default=(64, 64, 64), metavar="N|X,Y,Z",
                        help="grid size (at least 16 per axis; BraTS is 240,240,155)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of the collection (0 to 2^63 - 1)")
    parser.add_argument("--layout", default="brats", choices=["brats", "original"],
                        help="folder layout: BraTS2020's, or the original PatchDDM code's")


def run(args) -> int:
    from ..data import write_phantoms

    if min(args.size) < 16:
        raise InputError(f"--size {args.size}: phantoms need at least 16 voxels per axis")
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    start = time.perf_counter()
    written = write_phantoms(out, n=args.n, shape=args.size, seed=args.seed, layout=args.layout,
                             progress=not args.quiet)
    print(f"{len(written)} phantom case(s) of {args.size[0]}x{args.size[1]}x{args.size[2]} written to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK
