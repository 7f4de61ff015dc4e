"""Every op's schema is written once (patchddm_fast/ops/schemas.def): the compiled ops and the
Triton ops are registered under exactly those schemas."""

import pytest
import torch

import patchddm_fast.ops  # noqa: F401  (registers the ops)
from patchddm_fast._extension import EXTENSION
from patchddm_fast.ops._backends import TRITON_IMPORTABLE
from patchddm_fast.ops._schemas import mutated_args, schema, schemas

OPS = sorted(schemas())


def test_schemas_def_lists_every_op():
    assert {"avg_skip", "group_norm_silu_forward", "group_norm_silu_backward", "group_norm_silu_apply",
            "group_norm_silu_apply_out", "group_norm_silu_stats", "noise_update", "noise_update_out", "philox_normal", "assemble_input",
            "assemble_input_out", "cpu_isa", "conv3d_weight_grad", "conv3d_winograd"} == set(OPS)
    assert mutated_args("group_norm_silu_apply_out") == ("out",)
    assert mutated_args("noise_update_out") == ("out", "x0_out")
    assert mutated_args("assemble_input_out") == ("out",)
    with pytest.raises(KeyError, match="no schema for 'nothing'"):
        schema("nothing")


@pytest.mark.skipif(not EXTENSION.loaded, reason="needs the compiled extension")
@pytest.mark.parametrize("op", OPS)
def test_compiled_op_has_the_schema(op):
    assert str(getattr(torch.ops.patchddm, op).default._schema) == f"patchddm::{op}{schema(op)}"


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason="triton is not importable")
# cpu_isa, conv3d_weight_grad and conv3d_winograd: CPU kernels only, no Triton twin
@pytest.mark.parametrize("op", [op for op in OPS if op not in ("cpu_isa", "conv3d_weight_grad", "conv3d_winograd")])
def test_triton_op_has_the_schema(op):
    assert str(getattr(torch.ops.patchddm_triton, op).default._schema) == f"patchddm_triton::{op}{schema(op)}"
