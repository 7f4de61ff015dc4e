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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 6, 40, 30, 31), 3), ((1, 3, 5, 6, 7), 3)])
def test_cpu_schedules_give_the_same_bits(dtype, shape, groups, layout):
    # The CPU kernels run whole groups per thread when the (batch, group) pairs share out
    # evenly over the threads (1 thread here), else each pass over (channel, chunk) units (3
    # groups on 2 threads); both sum the same units in the same order, so the results are
    # equal bit for bit. The first shape has channels of several chunks. Channels-last inputs
    # split into chunks of rows by the shape alone: the same bits on any number of threads too.
    if "cpu" not in [p.values[0] for p in KERNEL_BACKENDS if p.values[1] == "cpp"]:
        pytest.skip("needs the compiled CPU kernels")
    inputs = make_inputs(shape, ("add", "skip", "weight", "bias"), dtype, "cpu", requires_grad=True)
    if layout == "channels_last":
        inputs = channels_last_twin(inputs)
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


def native_channels_last(device, backend):
    """Whether the backend computes channels-last tensors in their layout (the compiled CPU
    kernel); the others compute on contiguous copies."""
    return device == "cpu" and backend == "cpp"


def assert_same(actual, expected, native=False, scale=1.0):
    """Backends that compute on the contiguous copy of a channels-last input give the same bits
    as for the contiguous input. The native channels-last CPU kernel sums in another order:
    its results agree within float32 rounding, at the reference tolerances (times `scale`,
    which the caller explains)."""
    if native:
        assert_close(actual, expected, scale=scale)
    else:
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
    native = native_channels_last(device, backend)
    assert_same(y, expected_y, native)
    assert_same(average, expected_average, native)  # one rounding of the same sum: equal anyway
    for name, grad in grads.items():
        leaf = last[name]
        # Each gradient in its input's layout: channels-last for x (and skip when it is).
        assert grad.stride() == leaf.stride(), (name, grad.stride(), leaf.stride())
        # backward reduces over each group twice, each float32 sum in another order: 4x, as
        # test_gradients_match_reference allows against the reference
        assert_same(grad, expected_grads[name], native, scale=4.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_channels_last_without_skip(device, backend):
    inputs = make_inputs((1, 4, 3, 2, 5), ("weight",), torch.float32, device)
    last = channels_last_twin(inputs, ("x",))
    y = run(last, 2, backend)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert_same(y, run(inputs, 2, backend), native_channels_last(device, backend))


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
        assert_same(a, e)  # the same kernel on the same tensors in both: the same bits


# -- the native channels-last CPU kernel ------------------------------------------------------

# Odd sizes for the channels-last loops, which run over patterns of k rows of C channels
# (k = 16 / gcd(C, 16)): channels per group 1, 3 and 4, channel counts that are not multiples
# of 16 (29 = the paper's, 12, 6, 9), spatial sizes that are not multiples of any vector
# width nor of k, batch 2, 4-D and 5-D.
CL_CASES = [
    ((2, 29, 5, 3, 7), 29),   # 1 channel per group, the paper's group count
    ((1, 12, 3, 5, 6), 4),    # 3 per group
    ((2, 12, 7, 1, 3), 3),    # 4 per group, a size-1 dimension
    ((2, 9, 11, 13), 3),      # 4-D, 3 per group
    ((1, 16, 2, 3, 5), 4),    # a multiple of 16 channels: one row per pattern
]
CL_OPTIONS = [("add", "skip", "weight", "bias"), ("weight", "bias"), ("skip",)]


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op dispatched while active, with the shapes of the new tensors it returns
    (views of its inputs, such as autograd's detach, move no data and are left out): a layout
    copy shows up as an op other than the kernels' returning a tensor of x's shape."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        results = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), [tuple(t.shape) for t in results if t.untyped_storage().data_ptr() not in given]))
        return out

    def full_size_ops(self, shape):
        return sorted({name for name, shapes in self.calls if tuple(shape) in shapes})


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("options", CL_OPTIONS, ids=str)
@pytest.mark.parametrize("shape,groups", CL_CASES, ids=str)
def test_channels_last_kernel_matches_reference_and_contiguous_kernel(dtype, options, shape, groups):
    layout = CHANNELS_LAST[len(shape)]
    params = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = make_inputs(shape, options, dtype, "cpu", requires_grad=True, param_dtype=params)
    last = channels_last_twin(inputs)
    assert not last["x"].is_contiguous()
    names = [n for n in ("x", "skip", "add", "weight", "bias") if inputs[n] is not None]
    grad_out, grad_avg = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)

    def outputs_and_gradients(given, backend):
        out = run(given, groups, backend)
        average, y = out if "skip" in options else (None, out)
        loss = (y.to(params) * grad_out.to(params)).sum()
        if average is not None:  # the residual path's gradient joins in through the average
            loss = loss + (average.to(params) * grad_avg.to(params)).sum()
        return average, y, torch.autograd.grad(loss, [given[n] for n in names])

    average, y, grads = outputs_and_gradients(last, "cpp")
    # outputs and the gradients of x and skip in channels-last, as the inputs
    for t in (y, average, grads[0], grads[1] if "skip" in options else None):
        if t is not None:
            assert t.is_contiguous(memory_format=layout) and not t.is_contiguous()
    ref_average, ref_y, ref_grads = outputs_and_gradients(inputs, "torch")
    kernel_average, kernel_y, kernel_grads = outputs_and_gradients(inputs, "cpp")  # NCDHW kernel
    # y: within one rounding of the output dtype of the float32 (float64) reference, as the
    # NCDHW kernel (test_forward_matches_reference)
    assert_close(y, ref_y)
    assert_close(y, kernel_y)
    if average is not None:  # (x + skip) / 2 rounded once: the same bits in every layout
        assert torch.equal(average, kernel_average) and torch.equal(average, ref_average)
    for name, a, e, k in zip(names, grads, ref_grads, kernel_grads):
        assert a.dtype == inputs[name].dtype and a.shape == inputs[name].shape
        # backward reduces over each group twice, each sum in its own order: 4x the
        # one-rounding tolerance, as test_gradients_match_reference
        assert_close(a, e, scale=4.0, msg=name)
        assert_close(a, k, scale=4.0, msg=name)


@pytest.mark.parametrize("options", [("add", "skip", "weight", "bias"), ("weight",)], ids=str)
def test_channels_last_kernel_makes_no_layout_copies(options):
    shape = (2, 12, 5, 3, 7)
    inputs = channels_last_twin(make_inputs(shape, options, torch.float32, "cpu", requires_grad=True))
    grad_out = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    leaves = [t for t in inputs.values() if t is not None]

    def logged(backend):
        log = OpLog()
        with log:
            out = run(inputs, 3, backend)
            y = out[1] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(y, leaves, grad_out)
        return log, y, grads

    log, y, grads = logged("cpp")
    # only the kernels touch tensors of x's size: no copy of x, skip, y, average or a gradient
    assert log.full_size_ops(shape) == ["patchddm.group_norm_silu_backward.default",
                                        "patchddm.group_norm_silu_forward.default"]
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(g.stride() == t.stride() for g, t in zip(grads, leaves))
    # the log does see the copies of the contiguous-computing reference
    reference_log, _, _ = logged("torch")
    assert "aten.clone.default" in reference_log.full_size_ops(shape)


@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 3, 7), 3), ((2, 6, 5, 7), 2)], ids=["3d", "2d"])
def test_channels_last_kernel_with_gradients_in_other_layouts(shape, groups):
    # The upstream gradients may come in another layout than the saved input (a contiguous
    # grad_out, a strided one): the autograd makes them like the input first, a copy of the
    # same values, so the results are those of channels-last gradients bit for bit.
    layout = CHANNELS_LAST[len(shape)]
    inputs = channels_last_twin(make_inputs(shape, ("add", "skip", "weight", "bias"), torch.float32, "cpu",
                                            requires_grad=True))
    leaves = [t for t in inputs.values() if t is not None]
    grad_out, grad_avg = torch.randn(shape), torch.randn(shape)
    results = []
    for make in (lambda t: t.contiguous(memory_format=layout), lambda t: t.contiguous(),
                 lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)):
        average, y = run(inputs, groups, "cpp")
        results.append(torch.autograd.grad([y, average], leaves, [make(grad_out), make(grad_avg)]))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert a.stride() == e.stride() and torch.equal(a, e)


def test_channels_last_kernel_checks_layouts():
    forward, backward = torch.ops.patchddm.group_norm_silu_forward, torch.ops.patchddm.group_norm_silu_backward
    x = torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(RuntimeError, match="skip must be laid out as x, ChannelsLast3d"):
        forward(x, x.contiguous(), None, None, None, 3, 1e-5)
    y, _, mean, rstd = forward(x, None, None, None, None, 3, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out must be laid out as x, ChannelsLast3d"):
        backward(y.contiguous(), None, x, None, None, None, mean, rstd, 3, 1.0)
    with pytest.raises(RuntimeError, match="grad_out must be laid out as x, Contiguous"):
        backward(y, None, x.contiguous(), None, None, None, mean, rstd, 3, 1.0)
    with pytest.raises(RuntimeError, match="x must be contiguous or channels-last"):
        forward(x.transpose(2, 3), None, None, None, None, 3, 1e-5)


def test_channels_last_kernel_gradcheck_float64():
    inputs = channels_last_twin(make_inputs((2, 4, 3, 2, 3), ("add", "skip", "weight", "bias"), torch.float64,
                                            "cpu", requires_grad=True, param_dtype=torch.float64))
    assert not inputs["x"].is_contiguous() and not inputs["skip"].is_contiguous()
    names = list(inputs)

    def f(*tensors):
        return run(dict(zip(names, tensors)), 2, "cpp")

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


def test_channels_last_kernel_over_several_chunks():
    # 4 channels: patterns of 4 rows, chunks of 4096 rows, so 17 chunks per batch entry, the
    # last one partial. Channels sit at 300 with spread 0.01, which the shifted sums keep.
    shape = (2, 4, 41, 37, 43)
    layout = torch.channels_last_3d
    x = (torch.randn(shape, dtype=torch.float64) * 0.01 + 300).float().contiguous(memory_format=layout)
    skip = x + 0.01 * torch.randn(shape).contiguous(memory_format=layout)
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    forward, backward = torch.ops.patchddm.group_norm_silu_forward, torch.ops.patchddm.group_norm_silu_backward
    y, average, mean, rstd = forward(x, skip, None, weight, bias, 2, 1e-5)
    assert torch.equal(average, ((x + skip) * 0.5).contiguous(memory_format=layout))  # one rounding, as torch
    expected = F.silu(F.group_norm(average.double(), 2, weight.double(), bias.double(), 1e-5))
    # y = silu(a * A + B) in float32, with |a * A| up to 300 * rstd * w: its rounding (a few
    # ulps of that product, 4 * 2^-24 relative) bounds the error, silu' < 1.1
    product = average.abs().max() * rstd.max() * weight.max()
    torch.testing.assert_close(y.double(), expected, atol=1.1 * 4 * 2 ** -24 * product.item(), rtol=0)
    # the backward against the NCDHW kernel's from the same saved input and statistics: sums of
    # 4 * 68231 elements per group, each in its own order (10x the one-rounding tolerance, as
    # test_gradients_over_several_chunks)
    grad_out, grad_avg = (torch.randn(shape).contiguous(memory_format=layout) for _ in range(2))
    native = backward(grad_out, grad_avg, average, None, weight, bias, mean, rstd, 2, 0.5)
    contiguous = backward(grad_out.contiguous(), grad_avg.contiguous(), average.contiguous(), None, weight, bias,
                          mean, rstd, 2, 0.5)
    assert native[0].is_contiguous(memory_format=layout)
    for a, e in zip(native, contiguous):
        assert_close(a, e, scale=10.0)


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
