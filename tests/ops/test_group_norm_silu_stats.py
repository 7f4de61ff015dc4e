"""group_norm_silu_stats: the fused forward's statistics pass alone, the same bits as the
forward's mean and rstd on the CPU; with group_norm_silu_apply, the forward's y."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import assert_close, backend_params
from patchddm_fast.ops import group_norm_silu_apply, group_norm_silu_stats, group_norm_silu_stats_reference

BACKENDS = backend_params("group_norm_silu_stats")
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
FORWARD = torch.ops.patchddm.group_norm_silu_forward
STATS = torch.ops.patchddm.group_norm_silu_stats

# (shape, groups): groups of 1, 3 and 4 channels; batch 2; odd sizes; a batch of one.
CASES = [((2, 12, 5, 6, 7), 12), ((2, 12, 5, 6, 7), 4), ((2, 12, 5, 6, 7), 3), ((1, 8, 9, 3, 5), 2)]


def make(shape, dtype, layout, with_add=True):
    """x (mean 2, std 3) laid out as `layout`, add, weight and bias (weight and bias only for
    the forward: the statistics do not depend on them)."""
    B, C = shape[:2]
    return dict(
        x=(torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=LAYOUTS[layout]),
        add=torch.randn(B, C) if with_add else None,
        weight=torch.rand(C) + 0.5,
        bias=torch.randn(C),
    )


def forward(inputs, groups, eps=1e-5):
    """The fused forward's y, mean and rstd (the CPU kernel)."""
    y, _, mean, rstd = FORWARD(inputs["x"], None, inputs["add"], inputs["weight"], inputs["bias"], groups, eps)
    return y, mean, rstd


def stats(inputs, groups, eps=1e-5, backend=None):
    with torch.no_grad():
        return group_norm_silu_stats(inputs["x"], inputs["add"], groups, eps, backend=backend)


def at_threads(n, f):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return f()
    finally:
        torch.set_num_threads(threads)


# -- the same bits as the forward ------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CASES, ids=str)
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "no_add"])
def test_cpu_kernel_gives_the_forwards_bits_and_y_through_apply(layout, dtype, shape, groups, with_add):
    inputs = make(shape, dtype, layout, with_add)
    y, mean, rstd = forward(inputs, groups)
    got_mean, got_rstd = stats(inputs, groups, backend="cpp")
    assert got_mean.dtype == mean.dtype and got_mean.shape == (shape[0], groups)
    assert torch.equal(got_mean, mean) and torch.equal(got_rstd, rstd)
    # the chain the slab forward runs: stats, then apply, is the fused forward bit for bit
    with torch.no_grad():
        chained = group_norm_silu_apply(inputs["x"], got_mean, got_rstd, inputs["add"], inputs["weight"],
                                        inputs["bias"], groups, backend="cpp")
    assert torch.equal(chained, y) and chained.stride() == y.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((2, 12, 40, 30, 31), 4), ((1, 6, 40, 30, 31), 3)], ids=str)
def test_cpu_kernel_bits_do_not_depend_on_threads(layout, shape, groups):
    # 37200 voxels: two chunks per channel. 2 x 4 groups share out evenly over threads (the
    # forward runs by group), 1 x 3 groups on 4 threads do not (by unit): either way the same bits.
    inputs = make(shape, torch.float32, layout)
    y, mean, rstd = at_threads(1, lambda: forward(inputs, groups))
    for n in (1, 4):
        got_mean, got_rstd = at_threads(n, lambda: stats(inputs, groups, backend="cpp"))
        assert torch.equal(got_mean, mean) and torch.equal(got_rstd, rstd), n
        fwd = at_threads(n, lambda: forward(inputs, groups))
        assert torch.equal(fwd[1], mean) and torch.equal(fwd[2], rstd), n


def test_cpu_kernel_reads_4d_channels_last_and_3d_inputs():
    for shape, fmt in (((2, 6, 5, 7), torch.channels_last), ((2, 6, 11), torch.contiguous_format)):
        x, add = torch.randn(shape).contiguous(memory_format=fmt), torch.randn(2, 6)
        _, _, mean, rstd = FORWARD(x, None, add, None, None, 3, 1e-5)
        with torch.no_grad():
            got = group_norm_silu_stats(x, add, 3, backend="cpp")
        assert torch.equal(got[0], mean) and torch.equal(got[1], rstd)


def test_other_strides_are_copied_first():
    # x transposed in H and W: no layout the kernel reads; the op copies it to contiguous.
    x, add = torch.randn(2, 6, 4, 7, 5).transpose(3, 4), torch.randn(2, 6)
    _, _, mean, rstd = FORWARD(x.contiguous(), None, add, None, None, 2, 1e-5)
    with torch.no_grad():
        got = group_norm_silu_stats(x, add, 2, backend="cpp")
    assert torch.equal(got[0], mean) and torch.equal(got[1], rstd)


# -- against the reference and a float64 oracle -------------------------------------------------------

def oracle(x, add, groups, eps):
    """mean and rstd in float64 from x's (rounded) values, two-pass."""
    u = x.double()
    if add is not None:
        u = u + add.double().reshape(add.shape + (1,) * (x.dim() - 2))
    u = u.reshape(x.shape[0], groups, -1)
    mean = u.mean(2)
    var = ((u - mean[..., None]) ** 2).mean(2)
    return mean, (var + eps).rsqrt()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CASES[1:], ids=str)
def test_matches_reference_and_oracle(device, backend, layout, dtype, shape, groups):
    inputs = make(shape, dtype, layout)
    mean, rstd = stats(inputs, groups, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == acc and mean.shape == rstd.shape == (shape[0], groups)
    ref_mean, ref_rstd = group_norm_silu_stats_reference(inputs["x"], inputs["add"], groups, 1e-5)
    # Every backend sums the same (rounded) values of x in float32 (float64 for float64 x), so the
    # slack is that of the arithmetic type, not of x's dtype: a few float32 ulps of the sums over
    # <= 756 elements with |u| ~ 3 (~1e-6 relative), inside TOLERANCES[float32] (1e-5); float64:
    # TOLERANCES[float64] (1e-10).
    assert_close(mean, ref_mean, dtype=acc)
    assert_close(rstd, ref_rstd, dtype=acc)
    # The float64 two-pass oracle: the same slack (its error is below float64's 1e-13).
    o_mean, o_rstd = oracle(inputs["x"], inputs["add"], groups, 1e-5)
    assert_close(mean.double(), o_mean, dtype=acc)
    assert_close(rstd.double(), o_rstd, dtype=acc)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_small_spread(device, backend, layout):
    # u ~ 1000 + 0.01 N(0, 1): E[u^2] - E[u]^2 in float32 would lose the variance entirely
    # (1e6 * 6e-8 = 0.06 >> var = 1e-4). The kernels sum u minus each channel's first value,
    # exact here (Sterbenz), so rstd keeps float32 precision against the float64 oracle: with
    # sums of ~1e-2-sized terms its relative error is ~1e-6, within 1e-5 (TOLERANCES[float32]).
    # The reference subtracts each group's first value before its var_mean: as good.
    # The Triton kernel merges its channels' means (~1000) in float32, as the Triton forward
    # does: each off by up to half an ulp of 1000 (3e-5) against a std of 0.014, so rstd is
    # good to ~2 x 3e-5 / 0.014 ~ 4e-3 relative (measured 1e-3): tolerance scaled 500x.
    x = (1000 + 0.01 * torch.randn(2, 8, 9, 10, 11)).contiguous(memory_format=LAYOUTS[layout])
    add = 0.01 * torch.randn(2, 8)
    with torch.no_grad():
        mean, rstd = group_norm_silu_stats(x, add, 2, 1e-6, backend=backend)
    o_mean, o_rstd = oracle(x, add, 2, 1e-6)
    assert_close(rstd.double(), o_rstd, dtype=torch.float32, scale=500.0 if backend == "triton" else 1.0)
    assert_close(mean.double(), o_mean, dtype=torch.float32)
    assert (o_rstd > 50).all()  # the spread really is small: std ~ 0.014 (x and add), rstd ~ 70


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_empty_input(device, backend):
    x = torch.randn(2, 4, 0, 3, 3)
    with torch.no_grad():
        mean, rstd = group_norm_silu_stats(x, None, 2, 0.25, backend=backend)
    # as the forward: the statistics of nothing, mean 0 and rstd 1 / sqrt(eps)
    assert torch.equal(mean, torch.zeros(2, 2)) and torch.equal(rstd, torch.full((2, 2), 2.0))


# -- not differentiable -----------------------------------------------------------------------------

def test_refuses_grad_under_grad_mode():
    inputs = make((2, 4, 3, 3, 3), torch.float32, "contiguous")
    add = inputs["add"].requires_grad_()
    with pytest.raises(RuntimeError, match="group_norm_silu_stats is not differentiable: add requires grad"):
        group_norm_silu_stats(inputs["x"], add, 2)
    # the compiled op refuses too (csrc/cpu/group_norm_silu_autograd.cpp)
    with pytest.raises(RuntimeError, match="group_norm_silu_stats is not differentiable: add requires grad"):
        STATS(inputs["x"], add, 2, 1e-5)
    x = inputs["x"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="group_norm_silu_stats is not differentiable: x requires grad"):
        STATS(x, None, 2, 1e-5)
    with torch.no_grad():  # fine without grad mode, and the results have no history
        mean, rstd = group_norm_silu_stats(x, add, 2)
        assert torch.equal(STATS(x, add, 2, 1e-5)[1], rstd)
    assert mean.grad_fn is None and not mean.requires_grad and not rstd.requires_grad


# -- fake tensors, opcheck, compile ---------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_fake_tensors_give_shape_and_dtype(device, backend, layout, dtype):
    with FakeTensorMode():
        x = torch.empty(2, 12, 9, 5, 3, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
        with torch.no_grad():
            mean, rstd = group_norm_silu_stats(x, torch.empty(2, 12), 3, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.shape == rstd.shape == (2, 3) and mean.dtype == rstd.dtype == acc


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    namespace = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    layouts = LAYOUTS if backend == "cpp" else {"contiguous": torch.contiguous_format}  # Triton: contiguous x
    for layout in layouts:
        for dtype in (torch.float32, torch.float64):
            inputs = make((2, 4, 5, 3, 2), dtype, layout)
            for add in (inputs["add"], None):
                torch.library.opcheck(namespace.group_norm_silu_stats, (inputs["x"], add, 2, 1e-5))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    inputs = make((2, 4, 6, 3, 2), torch.float32, "channels_last")

    def f(x, add):
        mean, rstd = group_norm_silu_stats(x, add, 2, backend=backend)
        return mean * 2, rstd

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, expected = compiled(inputs["x"], inputs["add"]), f(inputs["x"], inputs["add"])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # the same kernel


# -- errors -----------------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 6, 4, 3, 3)

    def call(*args, **kwargs):
        with torch.no_grad():
            return group_norm_silu_stats(*args, **kwargs)

    with pytest.raises(ValueError, match="groups=4 must be a positive divisor of the 6 channels"):
        call(x, None, 4)
    with pytest.raises(ValueError, match="groups=0 must be a positive divisor"):
        call(x, None, 0)
    with pytest.raises(TypeError, match="groups must be an integer"):
        call(x, None, 3.0)
    with pytest.raises(TypeError, match="x has dtype int64"):
        call(x.long(), None, 3)
    with pytest.raises(ValueError, match=r"add has shape \(2, 5\), expected \(batch, channels\)"):
        call(x, torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="add is on meta but x is on cpu"):
        call(x, torch.zeros(2, 6, device="meta"), 3)
    with pytest.raises(ValueError, match="eps must be positive and finite, got 0.0"):
        call(x, None, 3, 0.0)
    with pytest.raises(ValueError, match="x must have at least 3 dimensions"):
        call(x[:, :, 0, 0, 0], None, 3)


def test_compiled_kernel_checks_its_own_inputs():
    # torch.ops.patchddm.group_norm_silu_stats is public too: the C++ checks (group_norm_silu_args.h).
    x = torch.randn(2, 6, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"x must be contiguous or channels-last .* \(call .contiguous\(\) first\)"):
        STATS(x.transpose(3, 4), None, 3, 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous or channels-last"):
        STATS(x[:, :, 1:], None, 3, 1e-5)  # a depth slab: statistics are of whole tensors
    with pytest.raises(RuntimeError, match="groups=4 must be a positive divisor of the 6 channels"):
        STATS(x, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"add has shape \[2, 5\], expected \[2, 6\]"):
        STATS(x, torch.zeros(2, 5), 3, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be positive and finite"):
        STATS(x, None, 3, float("nan"))
    with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64, got Int"):
        STATS(x.int(), None, 3, 1e-5)
