"""The compiled extension: built, loaded, complete, and reported by info()."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import patchddm_fast
from patchddm_fast._extension import EXTENSION
from patchddm_fast.ops import FastOp

NATIVE_OPS = sorted({op.native for op in FastOp.registry.values()})
# The ops with a CUDA kernel: those whose CUDA preference order names it.
CUDA_NATIVE_OPS = sorted({op.native for op in FastOp.registry.values() if "cuda" in op.cuda_order})


def _cuda_buildable() -> bool:
    """What setup.py decides: CUDA kernels are built when torch is a CUDA build and nvcc exists."""
    return (torch.version.cuda is not None and os.environ.get("PATCHDDM_NO_CUDA", "") in ("", "0")
            and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")))


def test_extension_loaded():
    assert EXTENSION.loaded, EXTENSION.error


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert EXTENSION.has_kernel(op, "CPU")


@pytest.mark.parametrize("op", CUDA_NATIVE_OPS)
def test_cuda_kernels_compiled_wherever_nvcc_is(op):
    # Compiled even without a GPU, so that CI compiles every .cu file.
    if not _cuda_buildable():
        assert not EXTENSION.has_kernel(op, "CUDA")
    else:
        assert EXTENSION.has_kernel(op, "CUDA"), f"{op}: no CUDA kernel although nvcc is present"


def test_info_reports_backends_and_versions():
    text = patchddm_fast.info()
    assert torch.__version__ in text
    assert "compiled extension: loaded" in text
    for op in FastOp.registry:
        assert op in text
    assert "cpu  cpp   : available" in text
    if _cuda_buildable() and not torch.cuda.is_available():
        assert "cuda cuda  : built (no GPU here to run it)" in text


def test_import_without_extension_falls_back_with_one_warning(tmp_path):
    # A copy of the package without _C: importing works, warns once how to build, and the ops
    # run on their references.
    package = tmp_path / "patchddm_fast"
    shutil.copytree(os.path.dirname(patchddm_fast.__file__), package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = (
        # An editable install's import hook would find the real _C for the copy: drop it.
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import patchddm_fast, torch\n"
        "messages = [str(w.message) for w in caught if 'patchddm_fast' in str(w.message)]\n"
        "assert len(messages) == 1 and 'pip install' in messages[0], messages\n"
        "h, s = torch.randn(3, 4), torch.randn(3, 4)\n"
        "assert torch.equal(patchddm_fast.ops.avg_skip(h, s), (h + s) / 2)\n"
        "print(patchddm_fast.info())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "patchddm_fast._C was not built" in result.stdout


CPU_ISA_RUN = """
import sys, torch
import patchddm_fast  # noqa: F401
from patchddm_fast import ops
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 8, 4, 8, 16, generator=g, requires_grad=True)
skip, temb = torch.randn(2, 8, 4, 8, 16, generator=g), torch.randn(2, 8, generator=g)
average, y = ops.group_norm_silu(x, None, None, 4, add=temb, skip=skip, backend="cpp")
y.sum().backward()
x_t, eps = torch.randn(3, 1, 9, 9, 9, generator=g), torch.randn(3, 1, 9, 9, 9, generator=g)
results = {"isa": torch.ops.patchddm.cpu_isa(), "y": y.detach(), "grad": x.grad}
# the channels-last loops: 29 channels (patterns of 16 rows), rows not a multiple of 16
x_cl = torch.randn(1, 29, 5, 6, 7, generator=g).contiguous(memory_format=torch.channels_last_3d)
skip_cl = torch.randn(x_cl.shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
for dtype in (torch.float32, torch.bfloat16):
    leaf = x_cl.to(dtype).detach().requires_grad_()
    average, y = ops.group_norm_silu(leaf, None, None, 29, add=temb[:1, :1].expand(1, 29).contiguous(),
                                     skip=skip_cl.to(dtype), backend="cpp")
    (y.float() * skip_cl).sum().backward()
    results[f"y channels_last {dtype}"], results[f"grad channels_last {dtype}"] = y.detach(), leaf.grad
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    results[f"ddim {dtype}"] = ops.ddim_step(x_t.to(dtype), eps.to(dtype), 0.5, 0.7, eta=1.0, seed=3, backend="cpp")[0]
    results[f"y {dtype}"] = ops.group_norm_silu(x.detach().to(dtype), None, None, 4, backend="cpp")
torch.save(results, sys.argv[1])
"""


def _run_with_cpu_isa(tmp_path, cap):
    env = {k: v for k, v in os.environ.items() if k != "PATCHDDM_CPU_ISA"}
    if cap is not None:
        env["PATCHDDM_CPU_ISA"] = cap
    path = tmp_path / f"{cap}.pt"
    result = subprocess.run([sys.executable, "-c", CPU_ISA_RUN, str(path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(path), result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not EXTENSION.loaded, reason="needs the compiled extension")
def test_cpu_isa_caps_the_vector_instruction_set_of_the_cpu_kernels(tmp_path):
    order = ["baseline", "avx2", "avx512"]
    best, _ = _run_with_cpu_isa(tmp_path, None)
    assert best["isa"] in order
    for cap in order:
        capped, _ = _run_with_cpu_isa(tmp_path, cap)
        assert capped["isa"] == order[min(order.index(cap), order.index(best["isa"]))]
        for key, value in best.items():
            if key == "isa":
                continue
            # The same results up to rounding: sums in other vector widths, and fused multiply-adds
            # where the instruction set has them.
            tol = 1e-5 if value.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(capped[key].float(), value.float(), atol=tol, rtol=tol, msg=f"{cap} {key}")
    unknown, stderr = _run_with_cpu_isa(tmp_path, "sse9")
    assert unknown["isa"] == best["isa"]
    assert "PATCHDDM_CPU_ISA=sse9 ignored" in stderr
