"""group_norm_silu_apply: GroupNorm + SiLU with the statistics given, on whole tensors and on
depth slabs of contiguous and channels-last ones, as x and as out."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, backend_params
from patchddm_fast.ops import group_norm_silu_apply, group_norm_silu_apply_reference

BACKENDS = backend_params("group_norm_silu_apply")
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
FORWARD = torch.ops.patchddm.group_norm_silu_forward

# (shape, groups): groups of 1, 3 and 4 channels; batch 2; odd sizes; a batch of one.
CASES = [((2, 12, 5, 6, 7), 12), ((2, 12, 5, 6, 7), 4), ((2, 12, 5, 6, 7), 3), ((1, 8, 9, 3, 5), 2)]


def make(shape, dtype, layout, options=("add", "weight", "bias")):
    """x (mean 2, std 3) laid out as `layout`, and the optional inputs named in options."""
    B, C = shape[:2]
    return dict(
        x=(torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=LAYOUTS[layout]),
        add=torch.randn(B, C) if "add" in options else None,
        weight=torch.rand(C) + 0.5 if "weight" in options else None,
        bias=torch.randn(C) if "bias" in options else None,
    )


def forward(inputs, groups):
    """The fused forward's y, mean and rstd (the CPU kernel)."""
    y, _, mean, rstd = FORWARD(inputs["x"], None, inputs["add"], inputs["weight"], inputs["bias"], groups, 1e-5)
    return y, mean, rstd


def apply(x, mean, rstd, inputs, groups, out=None, backend=None):
    with torch.no_grad():
        return group_norm_silu_apply(x, mean, rstd, inputs["add"], inputs["weight"], inputs["bias"], groups, out,
                                     backend=backend)


def interpreted_bf16(backend, dtype):
    """The Triton interpreter rounds float to bfloat16 by truncation (compiled Triton rounds to
    nearest): one more bfloat16 step of error than the reference's rounding."""
    return backend == "triton" and dtype == torch.bfloat16


# -- the same bits as the forward ---------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CASES, ids=str)
@pytest.mark.parametrize("options", [("add", "weight", "bias"), ()], ids=str)
def test_cpu_kernel_gives_the_forwards_bits(layout, dtype, shape, groups, options):
    inputs = make(shape, dtype, layout, options)
    y, mean, rstd = forward(inputs, groups)
    whole = apply(inputs["x"], mean, rstd, inputs, groups, backend="cpp")
    assert torch.equal(whole, y) and whole.stride() == y.stride()
    # slabs: the spans start elsewhere (vector loop vs remainder), the bits must not change
    for d0, d1 in ((0, 1), (1, 4), (3, shape[2])):
        slab = apply(inputs["x"][:, :, d0:d1], mean, rstd, inputs, groups, backend="cpp")
        assert torch.equal(slab, y[:, :, d0:d1])
        assert slab.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_kernel_gives_the_forwards_bits_after_a_skip(layout):
    # The forward normalises the stored average (x + skip) / 2: apply on it gives y.
    inputs = make((2, 8, 4, 5, 3), torch.bfloat16, layout)
    skip = torch.randn_like(inputs["x"])
    y, average, mean, rstd = FORWARD(inputs["x"], skip, inputs["add"], inputs["weight"], inputs["bias"], 2, 1e-5)
    assert torch.equal(apply(average, mean, rstd, inputs, 2, backend="cpp"), y)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_kernel_bits_do_not_depend_on_threads(layout):
    inputs = make((2, 12, 40, 30, 31), torch.float32, layout)  # several chunks per channel
    y, mean, rstd = forward(inputs, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = apply(inputs["x"][:, :, 3:20], mean, rstd, inputs, 4, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y[:, :, 3:20])


# -- against the reference and the formula ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CASES[1:], ids=str)
def test_matches_reference_and_formula(device, backend, layout, dtype, shape, groups):
    inputs = make(shape, dtype, layout)
    _, mean, rstd = forward(inputs, groups)
    x = inputs["x"][:, :, 1:4]
    out = apply(x, mean, rstd, inputs, groups, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=LAYOUTS[layout])
    expected = group_norm_silu_apply_reference(x, mean, rstd, inputs["add"], inputs["weight"], inputs["bias"], groups)
    # Same constants (float64 from the same float32 values, rounded once); the kernels differ from
    # the reference in the multiply-add (fused or not) and the exponential (the CPU kernel's
    # polynomial is within 1e-7 relative): a few float32 ulps, then one rounding to dtype, which
    # TOLERANCES allows; the truncating Triton interpreter is one more bfloat16 step off.
    scale = 4.0 if interpreted_bf16(backend, dtype) else 1.0
    assert_close(out, expected, scale=scale)
    # Independent of the code above: the formula in float64 from the same statistics.
    C, per_group = shape[1], shape[1] // groups
    shape_bc = (shape[0], C) + (1,) * (x.dim() - 2)
    m = mean.double().repeat_interleave(per_group, 1).reshape(shape_bc)
    r = rstd.double().repeat_interleave(per_group, 1).reshape(shape_bc)
    z = (x.double() + inputs["add"].double().reshape(shape_bc) - m) * r * inputs["weight"].double().reshape(
        1, C, 1, 1, 1) + inputs["bias"].double().reshape(1, C, 1, 1, 1)
    # The kernels round the constants A, B to float32 (relative 6e-8 each) where the formula does
    # not; with |z| < 15 that is below 2e-6 absolute, within float32's TOLERANCES at 2x (as
    # test_group_norm_silu's float64 oracle); other dtypes: their own rounding dominates.
    assert_close(out, F.silu(z).to(dtype), scale=2 * scale)


# -- slabs as x and as out ------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("out_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_writes_into_a_slab_of_a_buffer_and_nothing_else(device, backend, x_layout, out_layout, dtype):
    shape, groups, (d0, d1) = (2, 12, 7, 5, 3), 3, (2, 5)
    inputs = make(shape, dtype, x_layout)
    y, mean, rstd = forward(inputs, groups)
    buffer = torch.full((2, 12, 9, 5, 3), 7.0, dtype=dtype).contiguous(memory_format=LAYOUTS[out_layout])
    before = buffer.clone()
    target = buffer[:, :, 3:6]  # planes 3..5 of 9
    returned = apply(inputs["x"][:, :, d0:d1], mean, rstd, inputs, groups, out=target, backend=backend)
    assert returned is target
    if backend == "cpp":
        assert torch.equal(target, y[:, :, d0:d1])
    else:
        # The reference's and interpreter's tolerances of test_matches_reference_and_formula.
        assert_close(target, y[:, :, d0:d1], scale=4.0 if interpreted_bf16(backend, dtype) else 1.0)
    # every other plane untouched
    assert torch.equal(buffer[:, :, :3], before[:, :, :3]) and torch.equal(buffer[:, :, 6:], before[:, :, 6:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_kernel_reads_and_writes_slabs_in_place(layout):
    # The point of the slab support: no copy of x or of out, only the kernel runs.
    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    inputs = make((2, 12, 7, 5, 3), torch.float32, layout)
    _, mean, rstd = forward(inputs, 3)
    buffer = torch.zeros(2, 12, 9, 5, 3).contiguous(memory_format=LAYOUTS[layout])
    x, out = inputs["x"][:, :, 2:5], buffer[:, :, 3:6]
    log = Log()
    with log:
        apply(x, mean, rstd, inputs, 3, out=out, backend="cpp")
    assert log.ops == ["patchddm.group_norm_silu_apply_out.default"]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_other_strides_are_copied_first(device, backend):
    # A slab along H (not depth) is no layout the kernels read: made contiguous, then applied.
    inputs = make((2, 6, 4, 7, 5), torch.float32, "contiguous")
    y, mean, rstd = forward(inputs, 2)
    x = inputs["x"][:, :, :, 2:5]
    out = apply(x, mean, rstd, inputs, 2, backend=backend)
    assert out.is_contiguous()
    if backend == "cpp":
        assert torch.equal(out, y[:, :, :, 2:5])
    else:
        assert_close(out, y[:, :, :, 2:5])  # the reference's few float32 ulps, as above


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_4d_channels_last_and_3d_inputs(device, backend):
    for shape, fmt in (((2, 6, 5, 7), torch.channels_last), ((2, 6, 11), torch.contiguous_format)):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        add, weight, bias = torch.randn(2, 6), torch.rand(6) + 0.5, torch.randn(6)
        y, _, mean, rstd = FORWARD(x, None, add, weight, bias, 3, 1e-5)
        with torch.no_grad():
            out = group_norm_silu_apply(x[:, :, 1:4], mean, rstd, add, weight, bias, 3, backend=backend)
        assert out.is_contiguous(memory_format=fmt)
        if backend == "cpp":
            assert torch.equal(out, y[:, :, 1:4])
        else:
            assert_close(out, y[:, :, 1:4])  # float32: a few ulps, as above


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_empty_input(device, backend):
    x = torch.randn(2, 4, 0, 3, 3)
    mean, rstd = torch.zeros(2, 2), torch.ones(2, 2)
    with torch.no_grad():
        assert group_norm_silu_apply(x, mean, rstd, None, None, None, 2, backend=backend).shape == x.shape


# -- not differentiable -------------------------------------------------------------------------

def test_refuses_grad_under_grad_mode():
    inputs = make((2, 4, 3, 3, 3), torch.float32, "contiguous")
    _, mean, rstd = forward(inputs, 2)
    weight = inputs["weight"].requires_grad_()
    with pytest.raises(RuntimeError, match="group_norm_silu_apply is not differentiable: weight requires grad"):
        group_norm_silu_apply(inputs["x"], mean, rstd, inputs["add"], weight, inputs["bias"], 2)
    with torch.no_grad():  # fine without grad mode, and the result has no history
        out = group_norm_silu_apply(inputs["x"], mean, rstd, inputs["add"], weight, inputs["bias"], 2)
    assert out.grad_fn is None and not out.requires_grad
    # the compiled ops refuse too (csrc/cpu/group_norm_silu_autograd.cpp), functional and out=
    args = (inputs["x"], mean, rstd, inputs["add"], weight, inputs["bias"], 2)
    with pytest.raises(RuntimeError, match="group_norm_silu_apply is not differentiable: weight requires grad"):
        torch.ops.patchddm.group_norm_silu_apply(*args)
    with pytest.raises(RuntimeError, match="group_norm_silu_apply_out is not differentiable: weight requires grad"):
        torch.ops.patchddm.group_norm_silu_apply_out(*args, torch.empty_like(inputs["x"]))
    with torch.no_grad():
        assert torch.equal(torch.ops.patchddm.group_norm_silu_apply(*args), out)


# -- fake tensors, opcheck ------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_tensors_give_shape_dtype_and_layout(device, backend, layout):
    with FakeTensorMode():
        x = torch.empty(2, 12, 9, 5, 3, dtype=torch.bfloat16).contiguous(memory_format=LAYOUTS[layout])
        mean, rstd = torch.empty(2, 3), torch.empty(2, 3)
        with torch.no_grad():
            y = group_norm_silu_apply(x[:, :, 2:4], mean, rstd, None, None, None, 3, backend=backend)
            out = torch.empty_like(x)[:, :, 4:6]
            returned = group_norm_silu_apply(x[:, :, 2:4], mean, rstd, None, None, None, 3, out, backend=backend)
    assert y.shape == (2, 12, 2, 5, 3) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    assert returned is out


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, backend, layout):
    namespace = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    for dtype in (torch.float32, torch.float64):
        inputs = make((2, 4, 5, 3, 2), dtype, layout)
        _, mean, rstd = forward(inputs, 2)
        x = inputs["x"][:, :, 1:3]
        args = (x, mean, rstd, inputs["add"], inputs["weight"], inputs["bias"], 2)
        torch.library.opcheck(namespace.group_norm_silu_apply, args)
        out = torch.empty(2, 4, 6, 3, 2, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])[:, :, 2:4]
        torch.library.opcheck(namespace.group_norm_silu_apply_out, args + (out,))


# -- errors -------------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 6, 4, 3, 3)
    mean, rstd = torch.zeros(2, 3), torch.ones(2, 3)

    def call(*args, **kwargs):
        with torch.no_grad():
            return group_norm_silu_apply(*args, **kwargs)

    with pytest.raises(ValueError, match=r"mean must be a \(2, 3\) torch.float32 tensor on cpu .* got \(2, 2\)"):
        call(x, mean[:, :2], rstd, None, None, None, 3)
    with pytest.raises(ValueError, match=r"rstd must be a \(2, 3\) torch.float32 tensor .* got \(2, 3\) torch.float64"):
        call(x, mean, rstd.double(), None, None, None, 3)
    with pytest.raises(ValueError, match="mean must be .* got .* on meta"):
        call(x, mean.to("meta"), rstd, None, None, None, 3)
    with pytest.raises(ValueError, match="groups=4 must be a positive divisor of the 6 channels"):
        call(x, torch.zeros(2, 4), torch.ones(2, 4), None, None, None, 4)
    with pytest.raises(TypeError, match="x has dtype int64"):
        call(x.long(), mean, rstd, None, None, None, 3)
    with pytest.raises(ValueError, match=r"add has shape \(2, 5\), expected \(batch, channels\)"):
        call(x, mean, rstd, torch.zeros(2, 5), None, None, 3)
    with pytest.raises(ValueError, match=r"weight has shape \(5,\), expected \(6,\)"):
        call(x, mean, rstd, None, torch.ones(5), None, 3)
    with pytest.raises(ValueError, match="out has shape"):
        call(x, mean, rstd, None, None, None, 3, torch.empty(2, 6, 3, 3, 3))
    with pytest.raises(TypeError, match="out has dtype"):
        call(x, mean, rstd, None, None, None, 3, torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="out is on meta but x is on cpu"):
        call(x, mean, rstd, None, None, None, 3, torch.empty_like(x, device="meta"))
    with pytest.raises(TypeError, match="groups must be an integer"):
        call(x, mean, rstd, None, None, None, 3.0)


def test_compiled_kernel_checks_its_own_inputs():
    # torch.ops.patchddm.* are public too: the C++ checks (csrc/group_norm_silu_args.h).
    apply_op, apply_out = torch.ops.patchddm.group_norm_silu_apply, torch.ops.patchddm.group_norm_silu_apply_out
    x = torch.randn(2, 6, 4, 3, 3)
    mean, rstd = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=r"x must be contiguous or channels-last .* or a depth slab"):
        apply_op(x[:, :, :, 1:], mean, rstd, None, None, None, 3)
    with pytest.raises(RuntimeError, match=r"x must be contiguous or channels-last"):
        apply_op(x.transpose(2, 4), mean, rstd, None, None, None, 3)
    with pytest.raises(RuntimeError, match=r"rstd has shape \[2, 2\], expected \(2, 3\)"):
        apply_op(x, mean, rstd[:, :2].contiguous(), None, None, None, 3)
    with pytest.raises(RuntimeError, match="mean has dtype Double, expected Float"):
        apply_op(x, mean.double(), rstd, None, None, None, 3)
    with pytest.raises(RuntimeError, match="mean must be contiguous"):
        apply_op(x, torch.zeros(3, 2).t(), rstd, None, None, None, 3)
    with pytest.raises(RuntimeError, match="bias has shape"):
        apply_op(x, mean, rstd, None, None, torch.zeros(5), 3)
    with pytest.raises(RuntimeError, match="groups=4 must be a positive divisor"):
        apply_op(x, mean, rstd, None, None, None, 4)
    with pytest.raises(RuntimeError, match="out must be laid out as x, Contiguous"):
        apply_out(x, mean, rstd, None, None, None, 3, torch.empty_like(x, memory_format=torch.channels_last_3d))
    with pytest.raises(RuntimeError, match="out has dtype BFloat16, expected Float"):
        apply_out(x, mean, rstd, None, None, None, 3, torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="unsupported operation"):  # ATen's overlap check
        apply_out(x, mean, rstd, None, None, None, 3, torch.empty(1, 6, 4, 3, 3).expand(2, 6, 4, 3, 3))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compile_fullgraph(device, backend, layout):
    # As the README says of every op: torch.compile(fullgraph=True) traces it, slab and out= too.
    inputs = make((2, 4, 6, 3, 2), torch.float32, layout)
    _, mean, rstd = forward(inputs, 2)

    def f(x, mean, rstd, add, weight, bias, out):
        y = group_norm_silu_apply(x[:, :, 1:3], mean, rstd, add, weight, bias, 2, backend=backend)
        group_norm_silu_apply(x[:, :, 3:5], mean, rstd, add, weight, bias, 2, out[:, :, 0:2], backend=backend)
        return y * 2

    args = (inputs["x"], mean, rstd, inputs["add"], inputs["weight"], inputs["bias"])
    out, expected_out = (torch.zeros(2, 4, 3, 3, 2).contiguous(memory_format=LAYOUTS[layout]) for _ in range(2))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        value = compiled(*args, out)
        expected = f(*args, expected_out)
    # the same kernel on the same values; the plane of out that f leaves alone stays zero
    assert torch.equal(value, expected) and torch.equal(out, expected_out) and not out[:, :, 2].any()
    assert out[:, :, :2].ne(0).all()
