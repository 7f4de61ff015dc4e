import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, backend_params
from patchddm_fast.ops import group_norm_silu, group_norm_silu_reference

BACKENDS = backend_params("group_norm_silu")
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (shape, groups, options): groups = C / 4 and groups = C, prime and 1-sized dims, batch > 1,
# a 3-D input, a single voxel per channel, every combination of the optional inputs.
CASES = [
    ((2, 8, 5, 3, 7), 2, ("add", "skip", "weight", "bias")),
    ((1, 6, 13, 1, 11), 6, ("add", "weight", "bias")),
    ((3, 4, 1, 1, 1), 1, ("skip", "weight")),
    ((2, 8, 7), 4, ()),
]


def interpreted(device, backend):
    """The Triton interpreter rounds float to bfloat16 by truncation (compiled Triton rounds to
    nearest), so an average it stores can be one bfloat16 step off the reference's."""
    return backend == "triton" and device == "cpu"


def make_inputs(shape, options, dtype, device, *, requires_grad=False, param_dtype=torch.float32):
    """x (mean 2, std 3: a mean well away from 0), and the optional inputs named in options."""
    B, C = shape[:2]

    def leaf(t):
        return t.requires_grad_(requires_grad)

    return dict(
        x=leaf((torch.randn(shape, device=device) * 3 + 2).to(dtype)),
        skip=leaf(torch.randn(shape, device=device).to(dtype)) if "skip" in options else None,
        add=leaf(torch.randn(B, C, device=device).to(param_dtype)) if "add" in options else None,
        weight=leaf((torch.rand(C, device=device) + 0.5).to(param_dtype)) if "weight" in options else None,
        bias=leaf(torch.randn(C, device=device).to(param_dtype)) if "bias" in options else None,
    )


def run(inputs, groups, backend, eps=1e-5):
    return group_norm_silu(inputs["x"], inputs["weight"], inputs["bias"], groups, eps, add=inputs["add"],
                           skip=inputs["skip"], backend=backend)


def float64_oracle(inputs, groups, eps=1e-5):
    """The formula in float64 from the inputs, independent of the reference's code path."""
    x = inputs["x"].detach().double()
    if inputs["skip"] is not None:
        x = ((x + inputs["skip"].detach().double()) / 2).to(inputs["x"].dtype).double()
    if inputs["add"] is not None:
        x = x + inputs["add"].detach().double().reshape(inputs["add"].shape + (1,) * (x.dim() - 2))
    w = inputs["weight"].detach().double() if inputs["weight"] is not None else None
    b = inputs["bias"].detach().double() if inputs["bias"] is not None else None
    return F.silu(F.group_norm(x, groups, w, b, eps))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,options", CASES, ids=str)
def test_forward_matches_reference(device, backend, dtype, shape, groups, options):
    inputs = make_inputs(shape, options, dtype, device)
    out = run(inputs, groups, backend)
    expected = group_norm_silu_reference(inputs["x"], inputs["weight"], inputs["bias"], groups,
                                         add=inputs["add"], skip=inputs["skip"])
    # Interpreted Triton (numpy) rounds more intermediates to bfloat16 than a compiled kernel
    # does: a few more bfloat16 roundings, allowed for with 4x the one-rounding tolerance.
    scale = 4.0 if interpreted(device, backend) and dtype == torch.bfloat16 else 1.0
    if "skip" in options:
        (average, out), (expected_average, expected) = out, expected
        assert average.dtype == dtype and average.shape == inputs["x"].shape
        assert_close(average, expected_average)
    assert out.dtype == dtype and out.shape == inputs["x"].shape
    assert_close(out, expected, scale=scale)
    # independent of the reference: float64 statistics, rounded once to dtype
    assert_close(out, float64_oracle(inputs, groups).to(dtype), scale=2 * scale)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [("add", "skip", "weight", "bias"), ("weight",), ()], ids=str)
def test_gradients_match_reference(device, backend, dtype, options):
    shape, groups = (2, 8, 3, 5, 2), 2
    inputs = make_inputs(shape, options, dtype, device, requires_grad=True)
    leaves = [t for t in inputs.values() if t is not None]
    out_weight = torch.randn(shape, device=device)
    avg_weight = torch.randn(shape, device=device)

    def gradients(backend):
        out = run(inputs, groups, backend)
        if isinstance(out, tuple):  # the average feeds the residual path: its gradient joins in
            average, out = out
            loss = (out.float() * out_weight).sum() + (average.float() * avg_weight).sum()
        else:
            loss = (out.float() * out_weight).sum()
        return torch.autograd.grad(loss, leaves)

    expected = gradients("torch")
    actual = gradients(backend)
    rough = interpreted(device, backend) and dtype == torch.bfloat16
    for leaf, a, e in zip(leaves, actual, expected):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        # parameters' gradients are float32 sums; in the truncating interpreter they inherit its
        # bfloat16 rounding of the average
        assert_close(a, e, dtype=torch.bfloat16 if rough else leaf.dtype, scale=4.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_when_one_output_is_unused(device, backend):
    # Autograd hands the backward None for an unused output (no zeros are materialised).
    inputs = make_inputs((2, 4, 3, 5), ("skip", "weight", "bias"), torch.float32, device, requires_grad=True)
    average, _ = run(inputs, 2, backend)
    grad_x, grad_skip, grad_weight = torch.autograd.grad(average.sum(), [inputs["x"], inputs["skip"],
                                                                         inputs["weight"]], allow_unused=True)
    assert torch.equal(grad_x, torch.full_like(grad_x, 0.5)) and torch.equal(grad_skip, grad_x)
    assert grad_weight is None or not grad_weight.any()
    grad_out = torch.randn_like(inputs["x"])
    actual = torch.autograd.grad((run(inputs, 2, backend)[1] * grad_out).sum(), [inputs["x"], inputs["weight"]])
    expected = torch.autograd.grad((run(inputs, 2, "torch")[1] * grad_out).sum(), [inputs["x"], inputs["weight"]])
    for a, e in zip(actual, expected):
        # Backward reduces over each group twice (two float32 sums in another order than the
        # reference's autograd), so 4x the one-rounding tolerance.
        assert_close(a, e, scale=4.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_float64(device, backend):
    # The interpreter runs each program in Python, the reference many small ops: a smaller
    # problem keeps them quick.
    shape = (1, 2, 3) if interpreted(device, backend) or backend == "torch" else (2, 4, 3, 2)
    inputs = make_inputs(shape, ("add", "skip", "weight", "bias"), torch.float64, device, requires_grad=True,
                         param_dtype=torch.float64)
    names = list(inputs)
    groups = shape[1] // 2

    def f(*tensors):
        return run(dict(zip(names, tensors)), groups, backend)

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs_and_other_parameter_dtypes(device, backend):
    B, C, D, H, W = 2, 4, 3, 5, 6
    x = (torch.randn(B, C, W, H, D, device=device) * 2 + 1).transpose(2, 4)  # (B, C, D, H, W), strided
    skip = torch.randn(B, C, D, H, W * 2, device=device)[..., ::2]
    add = torch.randn(C, B, device=device, dtype=torch.float64).t()
    weight = torch.randn(2 * C, device=device, dtype=torch.bfloat16)[::2]
    bias = torch.randn(C, device=device, dtype=torch.float16)
    assert not (x.is_contiguous() or skip.is_contiguous() or add.is_contiguous() or weight.is_contiguous())
    average, out = group_norm_silu(x, weight, bias, 2, add=add, skip=skip, backend=backend)
    expected_average, expected = group_norm_silu_reference(x, weight, bias, 2, add=add, skip=skip)
    assert_close(average, expected_average)
    assert_close(out, expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_large_mean_small_spread_over_several_chunks(device, backend):
    # Each channel spans several chunks of every backend (CPU 32768 elements, Triton 16384,
    # CUDA 4096) and sits at 300 with spread 0.01: naive float32 sums of x^2 would lose the
    # variance entirely; the shifted sums keep it.
    shape = (1, 2, 23, 31, 47) if interpreted(device, backend) else (1, 4, 41, 37, 43)
    x = torch.randn(shape, device=device, dtype=torch.float64) * 0.01 + 300
    expected = F.silu(F.group_norm(x, 2))
    out = group_norm_silu(x.float(), None, None, 2, backend=backend)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)  # x rounded to float32: 2e-5 / 0.01


@pytest.mark.parametrize("device,backend", [p for p in KERNEL_BACKENDS if not interpreted(*p.values)])
def test_gradients_over_several_chunks(device, backend):
    shape, groups = (2, 4, 40, 30, 31), 2
    inputs = make_inputs(shape, ("add", "skip", "weight", "bias"), torch.float32, device, requires_grad=True)
    leaves = [t for t in inputs.values() if t is not None]
    grad_out = torch.randn(shape, device=device)

    def gradients(backend):
        return torch.autograd.grad((run(inputs, groups, backend)[1] * grad_out).sum(), leaves)

    for a, e in zip(gradients(backend), gradients("torch")):
        assert_close(a, e, scale=10.0)  # float32 sums over 37200 elements, in another order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 6, 40, 30, 31), 3), ((1, 3, 5, 6, 7), 3)])
def test_cpu_schedules_give_the_same_bits(dtype, shape, groups):
    # The CPU kernels run whole groups per thread when the (batch, group) pairs share out
    # evenly over the threads (1 thread here), else each pass over (channel, chunk) units (3
    # groups on 2 threads); both sum the same units in the same order, so the results are
    # equal bit for bit. The first shape has channels of several chunks.
    if "cpu" not in [p.values[0] for p in KERNEL_BACKENDS if p.values[1] == "cpp"]:
        pytest.skip("needs the compiled CPU kernels")
    inputs = make_inputs(shape, ("add", "skip", "weight", "bias"), dtype, "cpu", requires_grad=True)
    leaves = [t for t in inputs.values() if t is not None]
    grad_out = torch.randn(shape).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            average, y = run(inputs, groups, "cpp")
            results.append([average, y, *torch.autograd.grad((y.float() * grad_out.float()).sum(), leaves)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_empty_input(device, backend):
    x = torch.randn(2, 4, 0, 3, device=device)
    out = group_norm_silu(x, torch.ones(4, device=device), None, 2, backend=backend)
    assert out.shape == x.shape


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    namespace = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    # float64 is the dtype whose arithmetic type differs; the interpreter is slow
    for dtype in (torch.float64,) if interpreted(device, backend) else (torch.float32, torch.float64):
        inputs = make_inputs((2, 4, 3), ("add", "skip", "weight", "bias"), dtype, device, requires_grad=True)
        args = (inputs["x"], inputs["skip"], inputs["add"], inputs["weight"], inputs["bias"], 2, 1e-5)
        torch.library.opcheck(namespace.group_norm_silu_forward, args)
        x = inputs["x"].detach()
        _, average, mean, rstd = namespace.group_norm_silu_forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                     for a in args])
        backward_args = (torch.randn_like(x), torch.randn_like(x), average, inputs["add"].detach(),
                         inputs["weight"].detach(), None, mean, rstd, 2, 0.5)
        torch.library.opcheck(namespace.group_norm_silu_backward, backward_args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    def f(x, skip, add, weight, bias):
        average, y = group_norm_silu(x * 2, weight, bias, 2, add=add, skip=skip, backend=backend)
        return (y * y).sum() + average.sum()

    inputs = make_inputs((2, 4, 3, 2), ("add", "skip", "weight", "bias"), torch.float32, device, requires_grad=True)
    args = tuple(inputs.values())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(*args)
    grads = torch.autograd.grad(value, args)
    expected_grads = torch.autograd.grad(f(*args), args)
    assert_close(value.detach(), f(*args).detach())
    for a, e in zip(grads, expected_grads):
        assert_close(a, e)


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last_twin(inputs, names=("x", "skip")):
    """inputs with the tensors `names` copied to channels-last leaves (the same values)."""
    layout = CHANNELS_LAST[inputs["x"].dim()]
    return dict(inputs, **{n: inputs[n].detach().contiguous(memory_format=layout).requires_grad_()
                           for n in names if inputs[n] is not None})


def assert_same(actual, expected):
    """Every backend computes on the contiguous copy of a channels-last input: the same bits."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 3, 7), 2), ((2, 6, 4, 5), 3)], ids=["3d", "2d"])
@pytest.mark.parametrize("skip_layout", ["channels_last", "contiguous"])
def test_channels_last_input_gives_channels_last_outputs_and_gradients(device, backend, shape, groups, skip_layout):
    layout = CHANNELS_LAST[len(shape)]
    inputs = make_inputs(shape, ("add", "skip", "weight", "bias"), torch.float32, device, requires_grad=True)
    last = channels_last_twin(inputs, ("x", "skip") if skip_layout == "channels_last" else ("x",))
    assert not last["x"].is_contiguous()
    out_weight, avg_weight = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def outputs_and_gradients(given):
        average, y = run(given, groups, backend)
        loss = (y * out_weight).sum() + (average * avg_weight).sum()
        leaves = [given[n] for n in ("x", "skip", "add", "weight", "bias")]
        return (average, y), dict(zip(("x", "skip", "add", "weight", "bias"), torch.autograd.grad(loss, leaves)))

    (average, y), grads = outputs_and_gradients(last)
    (expected_average, expected_y), expected_grads = outputs_and_gradients(inputs)
    assert y.is_contiguous(memory_format=layout) and average.is_contiguous(memory_format=layout)  # as F.group_norm
    assert_same(y, expected_y)
    assert_same(average, expected_average)
    for name, grad in grads.items():
        leaf = last[name]
        # Each gradient in its input's layout: channels-last for x (and skip when it is).
        assert grad.stride() == leaf.stride(), (name, grad.stride(), leaf.stride())
        assert_same(grad, expected_grads[name])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_channels_last_without_skip(device, backend):
    inputs = make_inputs((1, 4, 3, 2, 5), ("weight",), torch.float32, device)
    last = channels_last_twin(inputs, ("x",))
    y = run(last, 2, backend)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert_same(y, run(inputs, 2, backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph_channels_last(device, backend):
    """torch.compile traces the layout changes: the compiled outputs and gradients have the
    strides of the eager ones."""
    def f(x, skip, add, weight, bias):
        return group_norm_silu(x, weight, bias, 2, add=add, skip=skip, backend=backend)

    inputs = channels_last_twin(make_inputs((2, 4, 3, 2, 5), ("add", "skip", "weight", "bias"), torch.float32,
                                            device, requires_grad=True))
    args = tuple(inputs.values())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for outputs in (compiled(*args), f(*args)):
        assert all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in outputs)
        grads = torch.autograd.grad(outputs[1].sum() + outputs[0].sum(), args)
        assert [g.stride() for g in grads] == [a.stride() for a in args]
    for a, e in zip(compiled(*args), f(*args)):
        assert_same(a, e)


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="groups=4 must be a positive divisor of the 6 channels"):
        group_norm_silu(x, None, None, 4)
    with pytest.raises(ValueError, match="groups=0"):
        group_norm_silu(x, None, None, 0)
    with pytest.raises(ValueError, match=r"weight has shape \(5,\), expected \(6,\)"):
        group_norm_silu(x, torch.ones(5), None, 3)
    with pytest.raises(ValueError, match=r"add has shape \(6, 2\), expected \(batch, channels\)"):
        group_norm_silu(x, None, None, 3, add=torch.zeros(6, 2))
    with pytest.raises(ValueError, match="skip has shape"):
        group_norm_silu(x, None, None, 3, skip=torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="skip has dtype"):
        group_norm_silu(x, None, None, 3, skip=x.double())
    with pytest.raises(ValueError, match="skip is on meta but x is on cpu"):
        group_norm_silu(x, None, None, 3, skip=torch.empty_like(x, device="meta"))
    with pytest.raises(TypeError, match="x has dtype int64"):
        group_norm_silu(torch.ones(2, 6, 5, dtype=torch.int64), None, None, 3)
    with pytest.raises(ValueError, match="x must have at least 3 dimensions"):
        group_norm_silu(torch.randn(2, 6), None, None, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        group_norm_silu(x, None, None, 3, eps=0.0)


def test_compiled_kernel_checks_its_own_inputs():
    # The C++ ops are public too (torch.ops.patchddm.*): they must refuse bad input themselves.
    forward, backward = torch.ops.patchddm.group_norm_silu_forward, torch.ops.patchddm.group_norm_silu_backward
    x = torch.randn(2, 6, 5)
    with pytest.raises(RuntimeError, match="groups=4 must be a positive divisor of the 6 channels"):
        forward(x, None, None, None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        forward(torch.randn(2, 5, 6).transpose(1, 2), None, None, None, None, 3, 1e-5)
    with pytest.raises(RuntimeError, match="bias has shape"):
        forward(x, None, None, None, torch.zeros(5), 3, 1e-5)
    with pytest.raises(RuntimeError, match="skip has dtype"):
        forward(x, x.half(), None, None, None, 3, 1e-5)
    _, _, mean, rstd = forward(x, None, None, None, None, 3, 1e-5)
    with pytest.raises(RuntimeError, match=r"rstd has shape \[2, 2\], expected \(2, 3\)"):
        backward(x, None, x, None, None, None, mean, rstd[:, :2].contiguous(), 3, 1.0)
    with pytest.raises(RuntimeError, match="mean has dtype Double, expected Float"):
        backward(x, None, x, None, None, None, mean.double(), rstd, 3, 1.0)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        backward(x[:1].contiguous(), None, x, None, None, None, mean, rstd, 3, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_elements(backend):
    # 130 channels of 256^3 in bfloat16 (2.2e9 elements, 4.4 GB): offsets past 2^31 must not
    # wrap. Groups are independent, so the last group is checked against the reference alone.
    C, groups = 130, 65
    x = torch.randn(1, C, 256, 256, 256, device="cuda", dtype=torch.bfloat16)
    out = group_norm_silu(x, None, None, groups, backend=backend)
    tail = slice(C - 2, C)
    expected = group_norm_silu_reference(x[:, tail], None, None, 1)
    assert_close(out[:, tail], expected)
