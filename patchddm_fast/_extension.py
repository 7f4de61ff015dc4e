"""Loading of the compiled extension patchddm_fast._C.

The extension registers its ops with the dispatcher (TORCH_LIBRARY) and defines no Python
module, so it is loaded with torch.ops.load_library. When it is missing or fails to load,
everything still works on the plain-PyTorch references, and one warning says how to build it.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the source tree "
    "(needs a C++ compiler and ninja; see README.md, 'Build switches')"
)


@dataclass(frozen=True)
class ExtensionState:
    loaded: bool
    path: str | None
    error: str | None

    def has_kernel(self, op: str, dispatch_key: str) -> bool:
        """Whether patchddm::<op> has a kernel for dispatch_key ("CPU" or "CUDA")."""
        if not self.loaded:
            return False
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"patchddm::{op}", dispatch_key)
        except RuntimeError:  # op not registered at all
            return False


def _load() -> ExtensionState:
    spec = importlib.util.find_spec("patchddm_fast._C")
    if spec is None or spec.origin is None:
        return ExtensionState(False, None, "patchddm_fast._C was not built")
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as exc:
        return ExtensionState(False, spec.origin, f"{spec.origin} failed to load: {exc}")
    return ExtensionState(True, spec.origin, None)


EXTENSION = _load()
if not EXTENSION.loaded:
    warnings.warn(
        f"patchddm_fast: compiled kernels unavailable ({EXTENSION.error}); falling back to the "
        f"PyTorch reference ops, which are slower and use more memory. To fix: {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )
