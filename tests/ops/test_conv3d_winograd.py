"""patchddm::conv3d_winograd (a 3x3x3 convolution by Winograd's F(2x2x2, 3x3x3), bfloat16 on
AVX512-BF16 CPUs, float32 on AVX-512 ones): exact where no rounding happens, within its error
bound elsewhere, and its refusals.

The kernel tests need its instructions: on a CPU without them they skip, and
test_refuses_a_cpu_without_its_instructions checks the error there instead.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from patchddm_fast.ops import conv3d_winograd, conv3d_winograd_input_grad, conv3d_winograd_reference
from patchddm_fast.ops.conv3d_winograd import conv3d_winograd_error_bound, kernel_available

CL = torch.channels_last_3d
# Each dtype, skipped where its kernel cannot run (bfloat16: AVX512-BF16; float32: AVX-512).
DTYPES = [pytest.param(dtype, marks=pytest.mark.skipif(not kernel_available(dtype), reason=f"no {dtype} kernel here"))
          for dtype in (torch.bfloat16, torch.float32)]
needs_kernel = pytest.mark.skipif(not kernel_available(),
                                  reason="needs the compiled extension and a CPU with AVX512-BF16")

# (batch, in channels, out channels, depth, height, width): the paper's channel counts; one
# input channel (a pair half zero) and 17 (a vector and one); output channels of one vector and
# one lane (17), four vectors (49: a micro-kernel block of 3 and one of 1), 130 (3 + 3 + 3);
# odd sizes (tiles half outside), a single voxel, widths of more than one block of 16 tiles
# (70: 16 + 16 + 3 tiles), batches of two.
SHAPES = [(1, 29, 29, 8, 8, 8), (2, 5, 3, 3, 5, 7), (1, 1, 17, 4, 6, 4), (1, 17, 49, 3, 4, 5),
          (1, 16, 130, 2, 3, 3), (1, 87, 29, 4, 4, 4), (1, 1, 1, 1, 1, 1), (1, 8, 16, 2, 3, 70),
          (2, 116, 116, 5, 3, 2)]


def _case(shape, seed=0, integers=False, layout=CL, dtype=torch.bfloat16):
    b, c_in, c_out, d, h, w = shape
    g = torch.Generator().manual_seed(seed)
    if integers:
        x = torch.randint(-1, 2, (b, c_in, d, h, w), generator=g).float()
        weight = torch.randint(-1, 2, (c_out, c_in, 3, 3, 3), generator=g).float()
        bias = torch.randint(-4, 5, (c_out,), generator=g).float()
    else:
        x = torch.randn(b, c_in, d, h, w, generator=g)
        weight = torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5
        bias = torch.randn(c_out, generator=g)
    return x.to(dtype).contiguous(memory_format=layout), weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_integer_data_gives_the_exact_convolution(shape, dtype):
    # Inputs and weights in {-1, 0, 1}: the transformed input is a sum of at most 8 of them, an
    # integer; the transformed weights are multiples of 1/8 of at most 27/8, which bfloat16 holds;
    # every product and sum is then exact in float32 (multiples of 1/8 far below 2^21), so the
    # only rounding is the output's to bfloat16 (none in float32). Any wrong tap, channel, tile
    # or edge shows.
    x, weight, bias = _case(shape, integers=True, dtype=dtype)
    out = conv3d_winograd(x, weight, bias)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2], *shape[3:])
    assert out.is_contiguous(memory_format=CL)
    exact = conv3d_winograd_reference(x.double(), weight.double(), bias.double())
    assert torch.equal(out, exact.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_data_within_the_error_bound(shape, dtype):
    x, weight, bias = _case(shape, dtype=dtype)
    out = conv3d_winograd(x, weight, bias)
    exact = conv3d_winograd_reference(x.double(), weight.double(), bias.double())
    assert ((out.double() - exact).abs() <= conv3d_winograd_error_bound(x, weight, bias)).all()


@needs_kernel
def test_error_is_about_a_direct_bfloat16_convolutions():
    # The bound above is a worst case; on random data the error is a small multiple of a direct
    # bfloat16 convolution's (oneDNN, from the same bfloat16 input and weights, whose error is
    # its output's rounding). Measured over 29 -> 29, 87 -> 87, 116 -> 116 and 29 -> 87
    # channels, three seeds, with and without bias: rms ratio 2.2-3.4 (rms relative error
    # 0.37-0.56 %, 1.0-1.4 u); 4 leaves a margin of 1.2, and a wrong tap would be off by 100x.
    for shape in [(1, 29, 29, 8, 16, 16), (1, 87, 87, 6, 8, 8)]:
        x, weight, bias = _case(shape, seed=3)
        exact = conv3d_winograd_reference(x.double(), weight.bfloat16().double(), bias.bfloat16().double())
        ours = conv3d_winograd(x, weight.bfloat16(), bias.bfloat16()).double() - exact
        direct = torch.nn.functional.conv3d(x, weight.bfloat16(), bias.bfloat16(), padding=1).double() - exact
        assert ours.pow(2).mean().sqrt() <= 4 * direct.pow(2).mean().sqrt()


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_gradient_is_the_flipped_transposed_convolution(dtype):
    x, weight, _ = _case((1, 29, 20, 5, 6, 7), dtype=dtype)
    x = x.double().requires_grad_(True)
    grad_out = torch.randn(1, 20, 5, 6, 7).to(dtype)
    torch.nn.functional.conv3d(x, weight.double(), padding=1).backward(grad_out.double())
    ours = conv3d_winograd_input_grad(grad_out, weight)
    assert ours.shape == x.shape and ours.dtype == dtype
    bound = conv3d_winograd_error_bound(grad_out, weight.flip(2, 3, 4).transpose(0, 1))
    assert ((ours.double() - x.grad.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_and_bias_in_either_dtype_layouts_and_thread_counts(dtype):
    shape = (2, 29, 29, 5, 7, 40)
    x, weight, bias = _case(shape, dtype=dtype)
    expected = conv3d_winograd(x, weight.bfloat16(), bias.bfloat16())
    # float32 weights holding bfloat16 values, a bfloat16 bias as float32: the same numbers
    assert torch.equal(conv3d_winograd(x, weight.bfloat16().float(), bias.bfloat16().float()), expected)
    assert torch.equal(conv3d_winograd(x.contiguous(), weight.bfloat16(), bias.bfloat16()), expected)
    no_bias = conv3d_winograd(x, weight.bfloat16())
    assert torch.equal(conv3d_winograd(x, weight.bfloat16(), torch.zeros(29)), no_bias)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert torch.equal(conv3d_winograd(x, weight.bfloat16(), bias.bfloat16()), expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_and_fake_tensors(dtype):
    x, weight, bias = _case((1, 5, 3, 2, 3, 4), dtype=dtype)
    torch.library.opcheck(torch.ops.patchddm.conv3d_winograd, (x, weight, bias))
    with FakeTensorMode() as mode:
        fake = conv3d_winograd(mode.from_tensor(x), mode.from_tensor(weight))
    assert fake.shape == (1, 3, 2, 3, 4) and fake.dtype == dtype and fake.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("x_spec,w_spec,b_spec,error,match", [
    ((1, 4, 3, 3, 3), (2, 4, 3, 3, 3), None, TypeError, "input has dtype float64"),
    ((1, 4, 3, 3), (2, 4, 3, 3, 3), None, ValueError, "input must have 5 dimensions"),
    ((1, 4, 3, 3, 3), (2, 3, 3, 3, 3), None, ValueError, r"weight has shape \(2, 3, 3, 3, 3\)"),
    ((1, 4, 3, 3, 3), (2, 4, 1, 1, 1), None, ValueError, "expected \\(O, 4, 3, 3, 3\\)"),
    ((1, 4, 3, 3, 3), (2, 4, 3, 3, 3), (3,), ValueError, r"bias has shape \(3,\)"),
], ids=["float64 input", "4-D", "channels", "kernel size", "bias"])
def test_refuses_bad_input(x_spec, w_spec, b_spec, error, match):
    dtype = torch.float64 if error is TypeError else torch.bfloat16
    with pytest.raises(error, match=match):
        conv3d_winograd(torch.zeros(x_spec, dtype=dtype), torch.zeros(w_spec),
                        torch.zeros(b_spec) if b_spec else None)


@needs_kernel
def test_the_compiled_op_checks_its_arguments_itself():
    op = torch.ops.patchddm.conv3d_winograd
    x, weight, bias = _case((1, 4, 2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="input must be bfloat16 or float32, got Double"):
        op(x.double(), weight, bias)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, weight[:, :3], bias)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, weight, bias[:1])
    with pytest.raises(RuntimeError, match="weight must be bfloat16 or float32"):
        op(x, weight.double(), bias)


@pytest.mark.parametrize("dtype,needs", [(torch.bfloat16, "AVX512-BF16"), (torch.float32, "AVX-512")])
def test_refuses_a_cpu_without_its_instructions(dtype, needs):
    if kernel_available(dtype):
        pytest.skip(f"this CPU runs the {dtype} kernel (the refusal is for CPUs without {needs})")
    x, weight, bias = _case((1, 4, 2, 3, 3, 3), dtype=dtype)
    with pytest.raises(RuntimeError, match="conv3d_winograd: the kernel cannot run here"):
        conv3d_winograd(x, weight, bias)
