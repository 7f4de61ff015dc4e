"""The fused noise update (ddim_step, ddpm_step, q_sample) and the in-kernel Philox noise
(philox_normal), every backend against closed forms in float64 and the reference."""

import math

import pytest
import torch

from helpers import DTYPES, TOLERANCES, assert_close, backend_params
from patchddm_fast.ops import (ddim_step, ddpm_step, noise_update_reference, philox_normal,
                               philox_normal_reference, q_sample)

BACKENDS = backend_params("noise_update")
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]
ALL_DTYPES = DTYPES + [torch.float64]
# The noise of every backend is within 2e-6 of the float64 value rounded to float32 (the
# polynomials of csrc/philox.h against float64 log / cos / sin).
NOISE_ATOL = 2e-6


def tolerance(dtype, noise_scale=0.0, scale=1.0):
    """(atol, rtol) for a result of dtype whose noise term is noise_scale * z; scale: the
    size of the terms that cancel. The ops apply their coefficients in float32, float64 data
    included, so float64 results are compared at float32's precision."""
    atol, rtol = TOLERANCES[torch.float32 if dtype == torch.float64 else dtype]
    return max(atol * scale, NOISE_ATOL * noise_scale), rtol


def close(actual, expected, dtype, noise_scale=0.0, scale=1.0):
    atol, rtol = tolerance(dtype, noise_scale, scale)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def inputs(shape, dtype, device, scale=1.0):
    x = (torch.randn(shape) * scale).to(device, dtype)
    eps = torch.randn(shape).to(device, dtype)
    return x, eps


def z64(shape, seed, offset, device):
    return philox_normal_reference(math.prod(shape), seed, offset, device=device).double().reshape(shape)


def ddim_expected(x, eps, ab_t, ab_prev, eta, clip, z):
    """DDIM in float64 from the formulas of the docstring (per-batch alpha_bar as tensors)."""
    x, eps = x.double(), eps.double()
    shape = (-1,) + (1,) * (x.dim() - 1)
    ab_t = torch.as_tensor(ab_t, dtype=torch.float64, device=x.device).reshape(shape)
    ab_prev = torch.as_tensor(ab_prev, dtype=torch.float64, device=x.device).reshape(shape)
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    eps2 = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
    prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps2
    if eta > 0:
        prev = prev + sigma * z
    return prev, x0, float(sigma.max())


# -- the generator -----------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_philox_normal_matches_reference(device, backend, dtype):
    cases = [((1,), 0, 0), ((3, 5, 7), 123, 77), ((1031,), 2**63 - 1, 2**40 + 3), ((2, 65), 2**31, 2**32 - 2),
             ((11,), 5, 2**63 - 6)]  # noise indices past 2^63
    for shape, seed, offset in cases:
        z = philox_normal(shape, seed, offset, dtype=dtype, device=device, backend=backend)
        assert z.shape == shape and z.dtype == dtype and z.device.type == device and z.is_contiguous()
        expected = philox_normal_reference(math.prod(shape), seed, offset, device=device, dtype=dtype)
        close(z, expected.reshape(shape), dtype, noise_scale=1.0)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_noise_is_keyed_by_seed_and_element_index(device, backend):
    n, offset = 1001, 13
    whole = philox_normal((n + offset,), 7, 0, device=device, backend=backend)
    # identical for identical (seed, offset), whatever the shape; offset shifts the stream
    shaped = philox_normal((7, 11, 13), 7, offset, device=device, backend=backend)
    assert torch.equal(shaped.flatten(), whole[offset:])
    assert torch.equal(philox_normal((7, 11, 13), 7, offset, device=device, backend=backend), shaped)
    # every lane of a Philox group starts a call correctly
    for start in range(5):
        assert torch.equal(philox_normal((9,), 7, start, device=device, backend=backend), whole[start:start + 9])
    assert not torch.equal(philox_normal((n,), 8, 0, device=device, backend=backend), whole[:n])


def test_backends_draw_the_same_noise():
    available = [p.values for p in KERNEL_BACKENDS]
    draws = [philox_normal((2, 3, 517), 2024, 5, device=d, backend=b).cpu() for d, b in available]
    for z in draws[1:]:
        torch.testing.assert_close(z, draws[0], atol=NOISE_ATOL, rtol=0)


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton"])
def test_noise_statistics(device, backend):
    # 2^20 draws: the sample mean has standard error 1e-3, a correlation too; bounds at ~5 sigma
    n = 2**20
    z = philox_normal((n,), 31337, 3, device=device, backend=backend).cpu().double()
    bound = 5 / math.sqrt(n)
    assert abs(z.mean()) < bound
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 5 * math.sqrt(24 / n)  # kurtosis
    assert float(z.abs().max()) < 5.8  # u >= 2^-24 bounds the radius: sqrt(48 ln 2) = 5.77
    for lag in (1, 2, 3, 4, 5, 8):  # neighbours inside and across Philox groups
        assert abs(_corr(z[:-lag], z[lag:])) < bound, lag
    for lane in range(4):  # each lane is standard normal on its own
        part = z[lane::4]
        assert abs(part.mean()) < 5 / math.sqrt(part.numel()) and abs(part.std() - 1) < 0.01
    # squares: the two normals of a Box-Muller pair share their radius, but must not correlate
    assert abs(_corr(z[0::2] ** 2, z[1::2] ** 2)) < 2 * bound
    # other offsets and other seeds give unrelated streams
    other_offset = philox_normal((n,), 31337, 3 + n, device=device, backend=backend).cpu()
    other_seed = philox_normal((n,), 31338, 3, device=device, backend=backend).cpu()
    assert abs(_corr(z, other_offset)) < bound and abs(_corr(z, other_seed)) < bound
    # the distribution itself: Kolmogorov-Smirnov distance to the standard normal
    sorted_z, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((cdf - ranks).abs().max()) < 1.95 / math.sqrt(n)  # the 0.1% critical value


# -- the updates -------------------------------------------------------------------------------

SHAPE = (3, 1, 5, 6, 7)  # batch 3, 210 elements each (not a multiple of 4)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.0, True), (0.7, False), (1.0, True)])
def test_ddim_step(device, backend, dtype, eta, clip):
    x, eps = inputs(SHAPE, dtype, device, scale=1.3)
    ab_t = torch.tensor([0.35, 0.5, 0.8])  # per batch element (an ensemble at different steps)
    ab_prev = torch.tensor([0.6, 0.9, 1.0])
    seed, offset = 99, 6
    prev, x0 = ddim_step(x, eps, ab_t, ab_prev, eta=eta, clip=clip, seed=seed, offset=offset, backend=backend)
    assert prev.dtype == dtype and x0.dtype == dtype and prev.shape == SHAPE and x0.shape == SHAPE
    expected, expected_x0, sigma = ddim_expected(x, eps, ab_t, ab_prev, eta, clip, z64(SHAPE, seed, offset, device))
    scale = 4.0  # x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) cancels terms up to |x| / sqrt(ab)
    close(prev, expected, dtype, noise_scale=sigma, scale=scale)
    close(x0, expected_x0, dtype, scale=scale)
    if clip:
        assert float(x0.abs().max()) <= 1
    # against the reference, which applies the same float32 coefficients
    if backend != "torch":
        ref_prev, ref_x0 = ddim_step(x, eps, ab_t, ab_prev, eta=eta, clip=clip, seed=seed, offset=offset,
                                     backend="torch")
        close(prev, ref_prev, dtype, noise_scale=sigma)
        close(x0, ref_x0, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step(device, backend, variance):
    x, eps = inputs(SHAPE, torch.float32, device)
    ab_t, ab_prev = 0.42, 0.47
    prev, x0 = ddpm_step(x, eps, ab_t, ab_prev, clip=False, variance=variance, seed=5, offset=1, backend=backend)
    xd, ed = x.double(), eps.double()
    beta = 1 - ab_t / ab_prev
    expected_x0 = (xd - math.sqrt(1 - ab_t) * ed) / math.sqrt(ab_t)
    mean = beta * math.sqrt(ab_prev) / (1 - ab_t) * expected_x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab_t) * xd
    sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab_t) if variance == "fixed_small" else beta)
    close(prev, mean + sigma * z64(SHAPE, 5, 1, device), torch.float32, noise_scale=sigma, scale=2)
    close(x0, expected_x0, torch.float32, scale=2)
    # the last step (ab_prev = 1) adds no noise and, clipped, returns x0 clamped
    last, last_x0 = ddpm_step(x * 3, eps, ab_t, 1.0, clip=True, seed=5, backend=backend)
    close(last, ((3 * xd - math.sqrt(1 - ab_t) * ed) / math.sqrt(ab_t)).clamp(-1, 1), torch.float32, scale=2)
    assert torch.equal(last, last_x0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_q_sample(device, backend, dtype):
    x0 = torch.randn(SHAPE).to(device, dtype)
    ab = torch.tensor([0.1, 0.5, 0.99])
    x_t, z = q_sample(x0, ab, seed=77, offset=3, backend=backend)
    assert x_t.dtype == dtype and z.dtype == dtype and z.shape == SHAPE
    # the noise returned is the noise drawn, and philox_normal regenerates it exactly
    assert torch.equal(z, philox_normal(SHAPE, 77, 3, dtype=dtype, device=device, backend=backend))
    close(z, z64(SHAPE, 77, 3, device), dtype, noise_scale=1)
    root = ab.double().sqrt().to(device).view(-1, 1, 1, 1, 1)
    expected = root * x0.double() + (1 - root**2).sqrt() * z64(SHAPE, 77, 3, device)
    close(x_t, expected, dtype, noise_scale=1)
    # without the noise returned, the update draws it in float32 inside: the same bits, except
    # that the returned noise of a half dtype was rounded first
    fused = q_sample(x0, ab, seed=77, offset=3, return_noise=False, backend=backend)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(fused, x_t)
    else:
        close(fused, x_t, dtype)
    # a scalar alpha_bar applies to every batch element
    scalar = q_sample(x0, 0.5, seed=77, offset=3, return_noise=False, backend=backend)
    per_batch = q_sample(x0, torch.full((3,), 0.5), seed=77, offset=3, return_noise=False, backend=backend)
    assert torch.equal(scalar, per_batch)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_into_a_channel_of_the_model_input(device, backend, dtype):
    # the sampler's pattern: x_t lives in channel 7 of an 8-channel buffer and x_prev goes
    # back into it, x0 into a channel of another buffer
    buffer = torch.randn(2, 8, 3, 4, 5).to(device, dtype)
    x_t = buffer[:, 7:8]
    eps = torch.randn(2, 1, 3, 4, 5).to(device, dtype)
    x0_buffer = torch.zeros(2, 3, 3, 4, 5, device=device, dtype=dtype)
    before = buffer.clone()
    expected_prev, expected_x0 = ddim_step(x_t.clone(), eps, 0.3, 0.5, eta=0.5, seed=1, backend=backend)
    prev, x0 = ddim_step(x_t, eps, 0.3, 0.5, eta=0.5, seed=1, out=x_t, x0_out=x0_buffer[:, 1:2], backend=backend)
    assert prev.data_ptr() == x_t.data_ptr() and x0.data_ptr() == x0_buffer[:, 1:2].data_ptr()
    assert torch.equal(buffer[:, :7], before[:, :7])  # the other channels are untouched
    assert torch.equal(buffer[:, 7:8], expected_prev)
    assert torch.equal(x0_buffer[:, 1:2], expected_x0)
    assert not x0_buffer[:, [0, 2]].any()
    # q_sample into the channel too (training input)
    q_sample(eps, 0.3, seed=4, out=buffer[:, 7:8], backend=backend, return_noise=False)
    assert torch.equal(buffer[:, 7:8], q_sample(eps, 0.3, seed=4, return_noise=False, backend=backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_aliasing_x_and_other_layouts(device, backend):
    x, eps = inputs((2, 3, 4, 6), torch.float32, device)
    expected_prev, expected_x0 = ddpm_step(x, eps, 0.4, 0.6, seed=8, offset=2, backend=backend)
    # out = x itself (in place)
    inplace = x.clone()
    prev, _ = ddpm_step(inplace, eps, 0.4, 0.6, seed=8, offset=2, out=inplace, backend=backend)
    assert prev is inplace and torch.equal(inplace, expected_prev)
    # x0_out = eps itself
    eps_copy = eps.clone()
    ddpm_step(x, eps_copy, 0.4, 0.6, seed=8, offset=2, x0_out=eps_copy, backend=backend)
    assert torch.equal(eps_copy, expected_x0)
    # non-contiguous inputs and an output that is not batch-strided (the op copies for them);
    # the noise follows the logical (row-major) index, not the memory layout
    xt = x.transpose(1, 3).contiguous().transpose(1, 3)
    out = torch.empty(6, 4, 3, 2, device=device).permute(3, 2, 1, 0)
    prev, x0 = ddpm_step(xt, eps.transpose(2, 3).contiguous().transpose(2, 3), 0.4, 0.6, seed=8, offset=2,
                         out=out, backend=backend)
    assert prev is out and torch.equal(out, expected_prev) and torch.equal(x0, expected_x0)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_rows_on_and_off_philox_group_boundaries(device, backend):
    # kernels take a vectorised path when rows start on groups of 4 noise indices (offset and
    # row length multiples of 4) and a bounds-checked one otherwise: both against the reference
    for inner, offset in [(8, 0), (8, 4), (8, 6), (13, 0), (12, 3)]:
        x, eps = inputs((3, inner), torch.float32, device)
        prev, x0 = ddpm_step(x, eps, 0.3, 0.4, seed=21, offset=offset, backend=backend)
        ref_prev, ref_x0 = ddpm_step(x, eps, 0.3, 0.4, seed=21, offset=offset, backend="torch")
        close(prev, ref_prev, torch.float32, noise_scale=1)
        close(x0, ref_x0, torch.float32)
        z = philox_normal((3, inner), 21, offset, device=device, backend=backend)
        close(z, philox_normal_reference(3 * inner, 21, offset, device=device).reshape(3, inner), torch.float32,
              noise_scale=1)


def test_empty_and_batch_one_shapes():
    for backend in [p.values[1] for p in BACKENDS if p.values[0] == "cpu"]:
        x = torch.randn(0, 3)
        prev, x0 = ddim_step(x, x, 0.5, 0.6, eta=1.0, seed=1, backend=backend)
        assert prev.shape == (0, 3) and x0.shape == (0, 3)
        assert philox_normal((0, 4), 1, backend=backend).shape == (0, 4)
        x = torch.randn(1, 1)
        prev, _ = ddim_step(x, x, 0.5, 0.6, eta=1.0, seed=1, offset=6, backend=backend)
        expected, _, sigma = ddim_expected(x, x, 0.5, 0.6, 1.0, False, z64((1, 1), 1, 6, "cpu"))
        close(prev, expected, torch.float32, noise_scale=sigma)


# -- torch.library and torch.compile -----------------------------------------------------------

@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    ops = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    x = torch.randn(2, 3, 5, device=device)
    eps = torch.randn(2, 3, 5, device=device)
    coef = torch.rand(2, 6, device=device)
    torch.library.opcheck(ops.noise_update, (x, eps, coef, True, True, 3, 1, True))
    torch.library.opcheck(ops.noise_update, (x.double(), None, coef[:1].double(), False, False, 0, 0, False))
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(ops.noise_update_out, (x, eps, coef, False, True, 3, 9, out, x0))
    torch.library.opcheck(ops.noise_update_out, (x, None, coef, False, True, 3, 9, out, None))
    torch.library.opcheck(ops.philox_normal, (torch.empty((), device=device).expand(4, 3), 5, 2))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    def f(x, eps, buffer):
        prev, x0 = ddim_step(x * 2, eps, 0.4, 0.7, eta=0.5, clip=True, seed=11, backend=backend)
        ddpm_step(x, eps, torch.tensor([0.3, 0.6]), 0.8, seed=12, out=buffer[:, 1:2], backend=backend)
        x_t, z = q_sample(x0, 0.5, seed=13, backend=backend)
        return prev + x_t - z + philox_normal(x.shape, 14, 0, device=x.device, backend=backend)

    x = torch.randn(2, 1, 3, 4, device=device)
    eps = torch.randn(2, 1, 3, 4, device=device)
    expected_buffer = torch.zeros(2, 3, 3, 4, device=device)
    expected = f(x, eps, expected_buffer)
    buffer = torch.zeros(2, 3, 3, 4, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, eps, buffer), expected)
    assert torch.equal(buffer, expected_buffer)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_inputs_name_the_problem(device, backend):
    x = torch.randn(3, 4, device=device)
    eps = torch.randn(3, 4, device=device)

    def step(**kwargs):
        args = dict(alpha_bar_t=0.5, alpha_bar_prev=0.6, eta=1.0, seed=1, backend=backend)
        args.update(kwargs)
        return ddim_step(args.pop("x", x), args.pop("eps", eps), args.pop("alpha_bar_t"), args.pop("alpha_bar_prev"),
                         **args)

    with pytest.raises(ValueError, match=r"alpha_bar_t must lie in \(0, 1\) \(NaN is invalid\), got \[nan\]"):
        step(alpha_bar_t=float("nan"))
    with pytest.raises(ValueError, match=r"alpha_bar_t must lie in \(0, 1\)"):
        step(alpha_bar_t=1.0)
    with pytest.raises(ValueError, match=r"alpha_bar_prev must lie in \(0, 1\]"):
        step(alpha_bar_prev=torch.tensor([0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match=r"alpha_bar_prev must lie in \(0, 1\]"):
        ddpm_step(x, eps, 0.5, float("nan"), seed=1, backend=backend)
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \(0, 1\)"):
        q_sample(x, torch.tensor([0.5, 0.0, 0.5]), seed=1, backend=backend)
    with pytest.raises(ValueError, match="alpha_bar_t has 2 values; expected 1 or the batch size 3"):
        step(alpha_bar_t=torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="eta must be >= 0, got nan"):
        step(eta=float("nan"))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        step(eta=-0.1)
    with pytest.raises(ValueError, match="variance must be"):
        ddpm_step(x, eps, 0.5, 0.6, variance="learned", backend=backend)
    with pytest.raises(ValueError, match=r"eps has shape \(4, 3\), expected \(3, 4\)"):
        step(eps=eps.t())
    with pytest.raises(TypeError, match="eps has dtype torch.float64"):
        step(eps=eps.double())
    with pytest.raises(ValueError, match="eps is on meta"):
        step(eps=torch.empty(3, 4, device="meta"))
    with pytest.raises(TypeError, match="x_t has dtype int64"):
        step(x=torch.ones(3, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="x_t must have at least 1 dimensions"):
        step(x=torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"out has shape \(3, 5\)"):
        step(out=torch.empty(3, 5, device=device))
    with pytest.raises(TypeError, match="x0_out has dtype torch.float16"):
        step(x0_out=torch.empty(3, 4, device=device, dtype=torch.half))
    for seed, error, message in [(-1, ValueError, r"seed must lie in \[0, 2\^63\)"),
                                 (2**63, ValueError, r"seed must lie in \[0, 2\^63\)"),
                                 (1.5, TypeError, "seed must be an int, got float"),
                                 (True, TypeError, "seed must be an int, got bool")]:
        with pytest.raises(error, match=message):
            step(seed=seed)
        with pytest.raises(error, match=message):
            philox_normal((2,), seed, device=device, backend=backend)
    with pytest.raises(ValueError, match=r"offset must lie in \[0, 2\^63\)"):
        q_sample(x, 0.5, seed=1, offset=-4, backend=backend)
    with pytest.raises(TypeError, match="dtype must be a float dtype"):
        philox_normal((2,), 1, dtype=torch.int32, device=device, backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_check_their_own_inputs(device, backend):
    # torch.ops.patchddm(_triton).* are public too: they refuse bad input themselves
    ops = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    error = (ValueError, TypeError) if backend == "triton" else RuntimeError
    x = torch.randn(3, 4, 5, device=device)
    coef = torch.rand(3, 6, device=device)
    with pytest.raises(error, match=r"coef must have shape \(1, 6\) or \(B, 6\) with B = 3"):
        ops.noise_update(x, None, coef[:2], False, True, 1, 0, True)
    with pytest.raises(error, match=r"coef must have shape|coef must be float32 or float64"):
        ops.noise_update(x, None, coef.half(), False, True, 1, 0, True)
    with pytest.raises(error, match="eps has shape"):
        ops.noise_update(x, x[:, :3], coef, False, True, 1, 0, True)
    with pytest.raises(error, match="x must be contiguous within each batch element"):
        ops.noise_update(x.transpose(1, 2), None, coef, False, True, 1, 0, True)
    with pytest.raises(error, match=r"seed must lie in \[0, 2\^63\)"):
        ops.noise_update(x, None, coef, False, True, -2, 0, True)
    with pytest.raises(error, match=r"offset must lie in \[0, 2\^63\)"):
        ops.philox_normal(x, 1, -1)
    with pytest.raises(error, match="out has dtype"):
        ops.noise_update_out(x, None, coef, False, True, 1, 0, x.double(), None)
    with pytest.raises(error, match="out must be contiguous within each batch element"):
        ops.noise_update_out(x, None, coef, False, True, 1, 0, torch.empty(3, 5, 4, device=device).transpose(1, 2),
                             None)
    if backend != "triton":  # ATen's overlap checks: writes must not land on unread input
        buffer = torch.randn(3 * 20 + 1, device=device)
        shifted = buffer[1:].view(3, 4, 5)
        with pytest.raises(RuntimeError, match="unsupported operation"):
            ops.noise_update_out(buffer[:-1].view(3, 4, 5), None, coef, False, True, 1, 0, shifted, None)
        with pytest.raises(RuntimeError, match="unsupported operation"):
            ops.noise_update_out(x, None, coef, False, True, 1, 0, x, x)
