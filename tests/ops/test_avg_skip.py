import pytest
import torch

from helpers import DTYPES, assert_close, backend_params
from patchddm_fast.ops import avg_skip, avg_skip_reference

BACKENDS = backend_params("avg_skip")
SHAPES = [(1,), (7,), (2, 3, 5, 7, 11), (1, 29, 1, 13, 3), (3, 17, 4, 4, 4), (4099,)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape):
    h = torch.randn(shape, device=device, dtype=dtype)
    skip = torch.randn(shape, device=device, dtype=dtype)
    out = avg_skip(h, skip, backend=backend)
    assert out.dtype == dtype and out.shape == h.shape
    assert_close(out, avg_skip_reference(h, skip))
    # independent of the reference: the float64 average rounded once
    assert_close(out, ((h.double() + skip.double()) / 2).to(dtype))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_and_unaligned_inputs(device, backend):
    base = torch.randn(3, 8, 6, 10, device=device)
    h = base.transpose(1, 3)                 # non-contiguous
    skip = torch.randn(3 * 10 * 6 * 8 + 1, device=device)[1:].reshape(h.shape)  # offset by one element
    out = avg_skip(h, skip, backend=backend)
    assert_close(out, (h + skip) / 2)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients(device, backend):
    h = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    skip = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    weight = torch.randn(2, 3, 4, 5, device=device)
    (avg_skip(h, skip, backend=backend) * weight).sum().backward()
    assert_close(h.grad, weight / 2)
    assert_close(skip.grad, weight / 2)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_float64(device, backend):
    h = torch.randn(2, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: avg_skip(a, b, backend=backend), (h, skip))


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_opcheck(device, backend):
    namespace = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    for dtype in (torch.float32, torch.float64):
        h = torch.randn(2, 3, 5, device=device, dtype=dtype, requires_grad=True)
        skip = torch.randn(2, 3, 5, device=device, dtype=dtype)
        torch.library.opcheck(namespace.avg_skip, (h, skip))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    def f(h, skip):
        return avg_skip(h * 2, skip, backend=backend).sum()

    h = torch.randn(4, 6, device=device, requires_grad=True)
    skip = torch.randn(4, 6, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(h, skip)
    value.backward()
    assert_close(value.detach(), f(h, skip).detach())
    assert_close(h.grad, torch.ones_like(h))


def test_bad_inputs_name_the_problem():
    h = torch.randn(2, 3)
    with pytest.raises(ValueError, match="skip has shape"):
        avg_skip(h, torch.randn(3, 2))
    with pytest.raises(TypeError, match="skip has dtype"):
        avg_skip(h, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="h has dtype int64"):
        avg_skip(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="skip must be a torch.Tensor"):
        avg_skip(h, 1.0)


def test_compiled_kernel_checks_its_own_inputs():
    # The C++ op is public too (torch.ops.patchddm.avg_skip): it must refuse bad input itself.
    with pytest.raises(RuntimeError, match="skip has shape"):
        torch.ops.patchddm.avg_skip(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.patchddm.avg_skip(torch.randn(3, 2).t(), torch.randn(2, 3))
