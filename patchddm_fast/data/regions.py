"""The BraTS evaluation regions from a label map (labels 0, 1, 2, 4), for numpy arrays and
torch tensors alike:

  WT (whole tumour) = label > 0        the region PatchDDM segments
  TC (tumour core)  = label 1 or 4
  ET (enhancing)    = label 4
"""

from __future__ import annotations

REGIONS = ("WT", "TC", "ET")


def whole_tumour(label):
    return label > 0


def brats_regions(label) -> dict:
    """{"WT": mask, "TC": mask, "ET": mask}, boolean, of label's shape."""
    enhancing = label == 4
    return {"WT": label > 0, "TC": (label == 1) | enhancing, "ET": enhancing}
