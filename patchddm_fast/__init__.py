"""patchddm_fast: fast, memory-efficient PatchDDM (3D diffusion models for brain-tumour
segmentation, Bieder et al., MIDL 2023) on fused C++/CUDA/Triton kernels.

Subpackages, from the bottom up (ARCHITECTURE.md draws how data flows through them):
ops (the fused kernels), nn (the U-Net), diffusion (schedules, loss, samplers), data (BraTS
cases, patches, phantoms), train (the trainer), inference (`patchddm sample`), evaluation
(Dice and HD95 of a folder of predictions). Each is imported when first used.
"""

import importlib

__version__ = "0.1.0"

from ._interrupt import interrupt_exits_quietly  # noqa: E402

with interrupt_exits_quietly():  # Ctrl-C while `patchddm` imports torch: one line, exit 130
    from . import ops  # noqa: E402  (loads the compiled extension, or warns how to build it)
    from ._info import info  # noqa: E402

_SUBPACKAGES = ("checkpoint_info", "data", "diffusion", "evaluation", "inference", "nn", "precision", "train")

__all__ = ["__version__", "info", "ops", *_SUBPACKAGES]


def __getattr__(name: str):
    # patchddm_fast.inference etc. without importing nibabel, matplotlib, ... up front
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
