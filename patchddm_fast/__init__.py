"""patchddm_fast: fast, memory-efficient PatchDDM (3D diffusion models for brain-tumour
segmentation, Bieder et al., MIDL 2023) on fused C++/CUDA/Triton kernels."""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the compiled extension, or warns how to build it)
from ._info import info  # noqa: E402

__all__ = ["__version__", "info", "ops"]
