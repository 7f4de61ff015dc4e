"""patchddm::conv3d_weight_grad (the bfloat16 weight and bias gradient of a 3x3x3 convolution on
AVX512-BF16 CPUs) against the float64 formula, and its refusals.

The kernel tests need its instruction: on a CPU without AVX512-BF16 they skip, and
test_refuses_a_cpu_without_avx512_bf16 checks the error there instead.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from patchddm_fast.ops import conv3d_weight_grad, conv3d_weight_grad_reference
from patchddm_fast.ops.conv3d_weight_grad import kernel_available

needs_kernel = pytest.mark.skipif(not kernel_available(),
                                  reason="needs the compiled extension and a CPU with AVX512-BF16")

UNIT = 2.0 ** -24  # float32's unit roundoff
SLICES = 16        # the kernel's most slices of planes (csrc/cpu/conv3d_weight_grad.cpp)

# (batch, in channels, out channels, depth, height, width): the paper's channel counts, odd
# heights and widths (a row pair of one row), one channel in or out, output channels past one
# micro-kernel block (130: 4 + 4 + 1 vectors), input channels padded to the tile (130 -> 132),
# depths that leave the last slices short or empty (17, 70), batches of two.
SHAPES = [(1, 29, 29, 8, 8, 8), (2, 5, 3, 3, 5, 7), (1, 8, 1, 4, 6, 4), (1, 130, 20, 2, 3, 4),
          (1, 3, 130, 3, 3, 3), (1, 29, 87, 4, 4, 4), (1, 1, 1, 1, 1, 1), (1, 16, 16, 17, 2, 33),
          (2, 4, 4, 35, 2, 2)]


def _pair(shape, layout=torch.channels_last_3d, seed=0):
    b, c_in, c_out, d, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, d, h, w, generator=g).bfloat16().contiguous(memory_format=layout)
    grad = torch.randn(b, c_out, d, h, w, generator=g).bfloat16().contiguous(memory_format=layout)
    return x, grad


def _chain(shape) -> int:
    """The longest chain of float32 roundings behind one result: two per position pair of a
    plane (VDPBF16PS rounds after each of its two products; the bias adds the pair's two values
    the same way), one per plane of a slice, one per slice."""
    b, _, _, d, h, w = shape
    return 2 * ((h + 1) // 2) * w + b * d + SLICES


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_float64_formula(shape):
    x, grad = _pair(shape)
    grad_weight, grad_bias = conv3d_weight_grad(x, grad)
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    assert grad_weight.shape == (shape[2], shape[1], 3, 3, 3) and grad_bias.shape == (shape[2],)
    exact_weight, exact_bias = conv3d_weight_grad_reference(x.double(), grad.double())
    # Every product of two bfloat16 values is exact in float32, so the error is the summation's:
    # at most chain * unit roundoff * the sum of the terms' magnitudes (a first-order bound of
    # recursive summation). A wrong tap, channel or position is off by order one of that sum.
    magnitude_weight, magnitude_bias = conv3d_weight_grad_reference(x.double().abs(), grad.double().abs())
    bound = _chain(shape) * UNIT
    assert ((grad_weight.double() - exact_weight).abs() <= bound * magnitude_weight + 1e-30).all()
    assert ((grad_bias.double() - exact_bias).abs() <= bound * magnitude_bias + 1e-30).all()


@needs_kernel
def test_any_layout_and_thread_count_give_the_same_bits():
    shape = (2, 29, 17, 9, 6, 10)
    x, grad = _pair(shape)
    expected = conv3d_weight_grad(x, grad)
    contiguous = conv3d_weight_grad(*_pair(shape, layout=torch.contiguous_format))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = conv3d_weight_grad(x, grad)
        torch.set_num_threads(3)
        three_threads = conv3d_weight_grad(x, grad)
    finally:
        torch.set_num_threads(threads)
    for other in (contiguous, one_thread, three_threads):
        assert all(torch.equal(a, b) for a, b in zip(other, expected))


@needs_kernel
def test_agrees_with_onednn_within_its_rounding():
    # oneDNN (what autograd runs) rounds its weight gradient to bfloat16: within 2^-8 of ours
    # relative to each entry, plus the summation bound above for entries near zero.
    shape = (1, 29, 29, 6, 32, 32)
    x, grad = _pair(shape)
    weight = torch.zeros(29, 29, 3, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    _, theirs, _ = torch.ops.aten.convolution_backward(grad, x, weight, [29], [1] * 3, [1] * 3, [1] * 3, False,
                                                       [0] * 3, 1, [False, True, True])
    ours, _ = conv3d_weight_grad(x, grad)
    magnitude, _ = conv3d_weight_grad_reference(x.double().abs(), grad.double().abs())
    slack = 2.0 ** -8 * theirs.double().abs() + _chain(shape) * UNIT * magnitude
    assert ((ours.double() - theirs.double()).abs() <= slack).all()


@needs_kernel
def test_opcheck_and_fake_tensors():
    x, grad = _pair((1, 5, 3, 2, 3, 4))
    torch.library.opcheck(torch.ops.patchddm.conv3d_weight_grad, (x, grad))
    with FakeTensorMode() as mode:
        fake_weight, fake_bias = conv3d_weight_grad(mode.from_tensor(x), mode.from_tensor(grad))
    assert fake_weight.shape == (3, 5, 3, 3, 3) and fake_bias.shape == (3,)
    assert fake_weight.dtype == fake_bias.dtype == torch.float32


@pytest.mark.parametrize("x_spec,grad_spec,error,match", [
    ((1, 4, 3, 3, 3), (1, 2, 3, 3, 3), TypeError, "input has dtype float32"),
    ((1, 4, 3, 3), (1, 2, 3, 3), ValueError, "input must have 5 dimensions"),
    ((1, 4, 3, 3, 3), (1, 2, 3, 3, 4), ValueError, "does not match input"),
    ((2, 4, 3, 3, 3), (1, 2, 3, 3, 3), ValueError, "does not match input"),
], ids=["float32", "4-D", "spatial size", "batch"])
def test_refuses_bad_input(x_spec, grad_spec, error, match):
    dtype = torch.float32 if error is TypeError else torch.bfloat16
    with pytest.raises(error, match=match):
        conv3d_weight_grad(torch.zeros(x_spec, dtype=dtype), torch.zeros(grad_spec, dtype=dtype))


@needs_kernel
def test_the_compiled_op_checks_its_arguments_itself():
    op = torch.ops.patchddm.conv3d_weight_grad
    x, grad = _pair((1, 4, 2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="input must be bfloat16, got Float"):
        op(x.float(), grad)
    with pytest.raises(RuntimeError, match="grad_out must be 5-D"):
        op(x, grad[0])
    with pytest.raises(RuntimeError, match="does not match input"):
        op(x, grad[:, :, :2])


@pytest.mark.skipif(kernel_available(), reason="this CPU runs the kernel (the refusal is for CPUs without AVX512-BF16)")
def test_refuses_a_cpu_without_avx512_bf16():
    x, grad = _pair((1, 4, 2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="conv3d_weight_grad: the kernel cannot run here"):
        conv3d_weight_grad(x, grad)
