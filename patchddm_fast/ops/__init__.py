"""The fast ops of patchddm_fast: fused kernels in C++ (CPU), CUDA and Triton, each with a
plain-PyTorch reference (`<op>_reference`) that is the test oracle and the fallback.

Every op takes a keyword `backend=` (cpp, cuda, triton or torch) to force an implementation;
by default the fastest available one for the tensor's device runs (see _backends.py).
"""

from ._backends import BackendUnavailable, FastOp, get_backend_override, set_backend
from .avg_skip import avg_skip, avg_skip_reference
from .conv3d_weight_grad import conv3d_weight_grad, conv3d_weight_grad_reference
from .conv3d_winograd import conv3d_winograd, conv3d_winograd_input_grad, conv3d_winograd_reference
from .assemble_input import assemble_input, assemble_input_reference, coord_encoding
from .group_norm_silu import (group_norm_silu, group_norm_silu_apply, group_norm_silu_apply_reference,
                              group_norm_silu_reference, group_norm_silu_stats, group_norm_silu_stats_reference)
from .noise_update import ddim_step, ddpm_step, noise_update_reference, philox_normal, q_sample
from .philox import philox_normal_reference

# The Triton modules import patchddm_fast.ops' own modules, so they load last.
for _op in FastOp.registry.values():
    _op.finalize()
del _op

__all__ = [
    "BackendUnavailable", "assemble_input", "assemble_input_reference", "avg_skip",
    "avg_skip_reference", "conv3d_weight_grad", "conv3d_weight_grad_reference",
    "conv3d_winograd", "conv3d_winograd_input_grad", "conv3d_winograd_reference", "coord_encoding", "ddim_step", "ddpm_step", "get_backend_override",
    "group_norm_silu", "group_norm_silu_apply", "group_norm_silu_apply_reference", "group_norm_silu_reference",
    "group_norm_silu_stats", "group_norm_silu_stats_reference",
    "noise_update_reference", "philox_normal", "philox_normal_reference", "q_sample", "set_backend",
]
