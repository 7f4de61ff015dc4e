"""The noise update: our fused kernels against the original's eager sequences, side by side.

Ops: `ddim-eta0` and `ddim-eta1` (a DDIM step, clipped x0, eta 0 and 1), `ddpm` (an ancestral
DDPM step, clipped x0, fixed_small variance), `q_sample` (forward noising for training,
returning x_t and the noise) and `philox` (standard normal noise alone).

Implementations:
- `eager`: the step as guided-diffusion (the original PatchDDM's code base) writes it:
  coefficients gathered per batch element with _extract_into_tensor (expanded views of the
  volume's shape, so sigma and exp(log variance) are computed at full size), the posterior
  mean that p_mean_variance computes even for DDIM, and a torch.randn_like drawn at every
  step, eta 0 included; for `philox`, torch.randn;
- `eager-lean` (ddim, ddpm): the same arithmetic written as lean as eager PyTorch allows:
  Python-float coefficients, no unused terms, randn only when sigma > 0;
- `compile`: torch.compile(fullgraph=True) of `eager`; `compile-lean` of `eager-lean`. On the
  CPU, Inductor draws its random numbers slowly (a generator seeded per element), so the
  ops that draw noise are slow compiled; ddim-eta0's `compile-lean` draws none;
- ours: `cpp` on CPU tensors, `cuda` and `triton` on CUDA tensors (the Triton interpreter is
  not timed), allocating their outputs like eager does, and `<backend>-out` writing into
  preallocated tensors as the sampler does (not for philox, which has no out=).

Cases: `single` = one volume, `ensemble` = 5 volumes (per-batch coefficients in eager);
1 channel, float32. Sizes: CPU 64^3 / 5 x 40^3; paper (GPU or --paper-scale) 256^3 / 5 x 256^3.

Every case first checks its result (eager given the same Philox noise as ours, so that the
two agree to float rounding), then records in extra_info its peak memory (CPU: peak RSS
growth of one run in a fresh process; GPU: max_memory_allocated), the bytes it must move,
its bandwidth and its speedups over the baselines (`eager`, `eager-lean`, `compile`,
`compile-lean`) that ran earlier in the session (from the fastest rounds, which other jobs on a shared machine
disturb least). Threads: OMP_NUM_THREADS (torch's default).

    pytest benchmarks/test_ops_noise_update.py --benchmark-only
    OMP_NUM_THREADS=1 pytest benchmarks/test_ops_noise_update.py --benchmark-only
    pytest benchmarks/test_ops_noise_update.py --benchmark-only --paper-scale
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.workloads import check_then_time

OPS = ("ddim-eta0", "ddim-eta1", "ddpm", "q_sample", "philox")
CASES = {"single": (1, 64, 256), "ensemble": (5, 40, 256)}  # batch, small size, paper size
STEPS, STEP = 20, 10  # a step from the middle of a 20-step respaced schedule
OURS = ("cpp", "cpp-out", "cuda", "cuda-out", "triton", "triton-out")
BASELINES = ("eager", "eager-lean", "compile", "compile-lean")
IMPLS = BASELINES + OURS
DEVICE_IMPLS = {"cpu": BASELINES + ("cpp", "cpp-out"), "cuda": BASELINES + ("cuda", "cuda-out", "triton", "triton-out")}
SEED = 1234


# -- the original's arithmetic (guided_diffusion/gaussian_diffusion.py) -----------------------

class SpacedSchedule:
    """guided-diffusion's arrays for the linear schedule respaced to STEPS steps, as tensors."""

    def __init__(self, device):
        from patchddm_fast.diffusion.schedule import NoiseSchedule

        full = NoiseSchedule.linear().alphas_cumprod
        kept = torch.linspace(0, 999, STEPS).round().long()
        ac = full[kept]
        betas = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        arrays = dict(
            alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
            posterior_mean_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        )
        for name, value in arrays.items():
            setattr(self, name, value.to(device))

    def value(self, name: str, t: int) -> float:
        return float(getattr(self, name)[t])


def _extract(arr, timesteps, shape):
    """guided-diffusion's _extract_into_tensor: per-batch values expanded to the data's shape."""
    res = arr[timesteps].float()
    while res.dim() < len(shape):
        res = res[..., None]
    return res.expand(shape)


def _pred_xstart(s, x, eps, t, clip):
    shape = x.shape
    x0 = _extract(s.sqrt_recip_alphas_cumprod, t, shape) * x - _extract(s.sqrt_recipm1_alphas_cumprod, t, shape) * eps
    return x0.clamp(-1, 1) if clip else x0


def eager_ddim(s, x, eps, t, eta, noise=None):
    """GaussianDiffusion.ddim_sample of an eps-predicting model (clip_denoised=True)."""
    shape = x.shape
    pred_xstart = _pred_xstart(s, x, eps, t, True)
    model_mean = _extract(s.posterior_mean_coef1, t, shape) * pred_xstart + \
        _extract(s.posterior_mean_coef2, t, shape) * x  # computed by p_mean_variance, unused by DDIM
    eps = (_extract(s.sqrt_recip_alphas_cumprod, t, shape) * x - pred_xstart) / \
        _extract(s.sqrt_recipm1_alphas_cumprod, t, shape)
    alpha_bar = _extract(s.alphas_cumprod, t, shape)
    alpha_bar_prev = _extract(s.alphas_cumprod_prev, t, shape)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    noise = torch.randn_like(x) if noise is None else noise
    mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(shape) - 1)))
    sample = mean_pred + nonzero_mask * sigma * noise
    return sample, pred_xstart, model_mean


def eager_ddpm(s, x, eps, t, noise=None):
    """GaussianDiffusion.p_sample of an eps-predicting model (fixed_small, clip_denoised=True)."""
    shape = x.shape
    pred_xstart = _pred_xstart(s, x, eps, t, True)
    model_mean = _extract(s.posterior_mean_coef1, t, shape) * pred_xstart + \
        _extract(s.posterior_mean_coef2, t, shape) * x
    model_log_variance = _extract(s.posterior_log_variance_clipped, t, shape)
    noise = torch.randn_like(x) if noise is None else noise
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(shape) - 1)))
    sample = model_mean + nonzero_mask * torch.exp(0.5 * model_log_variance) * noise
    return sample, pred_xstart


def eager_q_sample(s, x_start, t, noise=None):
    """GaussianDiffusion.q_sample with the noise it draws (training_losses keeps it)."""
    noise = torch.randn_like(x_start) if noise is None else noise
    shape = x_start.shape
    x_t = _extract(s.sqrt_alphas_cumprod, t, shape) * x_start + \
        _extract(s.sqrt_one_minus_alphas_cumprod, t, shape) * noise
    return x_t, noise


def lean_ddim(x, eps, ab, ab_prev, eta, noise=None):
    x0 = ((x - (1 - ab) ** 0.5 * eps) / ab**0.5).clamp(-1, 1)
    eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
    sigma = eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5
    prev = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
    if sigma > 0:
        prev = prev + sigma * (torch.randn_like(x) if noise is None else noise)
    return prev, x0


def lean_ddpm(x, eps, ab, ab_prev, c1, c2, sigma, noise=None):
    x0 = ((x - (1 - ab) ** 0.5 * eps) / ab**0.5).clamp(-1, 1)
    return c1 * x0 + c2 * x + sigma * (torch.randn_like(x) if noise is None else noise), x0


# -- workloads ------------------------------------------------------------------------------------

def shape_of(case: str, paper: bool):
    batch, small, large = CASES[case]
    size = large if paper else small
    return (batch, 1, size, size, size)


@functools.lru_cache(maxsize=1)  # every implementation of a case reads the same (unmodified) inputs
def make_inputs(case: str, paper: bool, device: str):
    generator = torch.Generator().manual_seed(0)
    shape = shape_of(case, paper)
    x = torch.randn(shape, generator=generator).to(device)
    eps = torch.randn(shape, generator=generator).to(device)
    return x, eps


def setup_run(op: str, case: str, impl: str, paper: bool = False, device: str = "cpu"):
    """A workload for benchmarks.memory: one update of a case by one implementation."""
    from patchddm_fast.ops import ddim_step, ddpm_step, philox_normal, q_sample

    x, eps = make_inputs(case, paper, device)
    s = SpacedSchedule(device)
    t = torch.full((x.shape[0],), STEP, dtype=torch.int64, device=device)
    ab, ab_prev = s.value("alphas_cumprod", STEP), s.value("alphas_cumprod_prev", STEP)
    eta = 1.0 if op == "ddim-eta1" else 0.0
    if impl in ("eager", "compile"):
        functions = {
            "ddim-eta0": lambda: eager_ddim(s, x, eps, t, 0.0)[:2],
            "ddim-eta1": lambda: eager_ddim(s, x, eps, t, 1.0)[:2],
            "ddpm": lambda: eager_ddpm(s, x, eps, t),
            "q_sample": lambda: eager_q_sample(s, x, t),
            "philox": lambda: torch.randn(x.shape, device=device),
        }
        run = functions[op]
        return torch.compile(run, fullgraph=True) if impl == "compile" else run
    if impl in ("eager-lean", "compile-lean"):
        if op.startswith("ddim"):
            run = lambda: lean_ddim(x, eps, ab, ab_prev, eta)  # noqa: E731
        elif op == "ddpm":
            c1, c2 = s.value("posterior_mean_coef1", STEP), s.value("posterior_mean_coef2", STEP)
            sigma = float(torch.exp(0.5 * s.posterior_log_variance_clipped[STEP]))
            run = lambda: lean_ddpm(x, eps, ab, ab_prev, c1, c2, sigma)  # noqa: E731
        else:
            raise ValueError(f"no lean variant of {op}")
        return torch.compile(run, fullgraph=True) if impl == "compile-lean" else run
    backend, _, variant = impl.partition("-")
    out = torch.empty_like(x) if variant == "out" else None
    x0_out = torch.empty_like(x) if variant == "out" else None
    if op.startswith("ddim"):
        return lambda: ddim_step(x, eps, ab, ab_prev, eta=eta, clip=True, seed=SEED, out=out, x0_out=x0_out,
                                 backend=backend)
    if op == "ddpm":
        return lambda: ddpm_step(x, eps, ab, ab_prev, clip=True, seed=SEED, out=out, x0_out=x0_out, backend=backend)
    if op == "q_sample":
        return lambda: q_sample(x, ab, seed=SEED, out=out, backend=backend)
    return lambda: philox_normal(x.shape, SEED, 0, device=device, backend=backend)


def expected_result(op: str, case: str, paper: bool, device: str):
    """The eager sequence with our noise (Philox, keyed like ours): what every implementation
    must give, to float rounding (the eager ones given randn noise are checked on shape)."""
    from patchddm_fast.ops import philox_normal

    x, eps = make_inputs(case, paper, device)
    s = SpacedSchedule(device)
    t = torch.full((x.shape[0],), STEP, dtype=torch.int64, device=device)
    z = philox_normal(x.shape, SEED, 0, device=device, backend="torch")
    if op.startswith("ddim"):
        return eager_ddim(s, x, eps, t, 1.0 if op == "ddim-eta1" else 0.0, noise=z)[:2]
    if op == "ddpm":
        return eager_ddpm(s, x, eps, t, noise=z)
    if op == "q_sample":
        return eager_q_sample(s, x, t, noise=z)
    return (z,)


def moved_bytes(op: str, case: str, paper: bool) -> int:
    """Bytes read plus written by one pass (the least any implementation must move), float32."""
    elements = 1
    for n in shape_of(case, paper):
        elements *= n
    tensors = {"ddim-eta0": 4, "ddim-eta1": 4, "ddpm": 4, "q_sample": 3, "philox": 1}[op]  # x, eps -> out, x0
    return 4 * elements * tensors


def check(op, impl, result, expected):
    results = result if isinstance(result, tuple) else (result,)
    assert len(results) == len(expected)
    draws_own_noise = impl in BASELINES and op != "ddim-eta0"
    for actual, wanted in zip(results, expected):
        assert actual.shape == wanted.shape and actual.dtype == wanted.dtype
        if not draws_own_noise:
            # A benchmark's sanity check: float32 kernel against the float32 eager formula, values
            # magnified up to 3.6x by 1/sqrt(alpha_bar); a few ulps, 2e-5 with margin.
            torch.testing.assert_close(actual, wanted, atol=2e-5, rtol=2e-5)
    if draws_own_noise and op != "philox":  # the noise-free part still matches: x0
        if op != "q_sample":
            torch.testing.assert_close(results[1], expected[1], atol=2e-5, rtol=2e-5)


_SECONDS: dict[tuple, float] = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", OPS)
def test_noise_update(benchmark, bench_device, paper_scale, op, case, impl):
    from patchddm_fast.ops import FastOp

    device = bench_device.type
    if impl not in DEVICE_IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device} tensors here (the Triton interpreter is not timed)")
    if impl.endswith("-lean") and op not in ("ddim-eta0", "ddim-eta1", "ddpm"):
        pytest.skip(f"eager is already lean for {op}")
    if impl.endswith("-out") and op == "philox":
        pytest.skip("philox_normal has no out= variant")
    backend = impl.partition("-")[0]
    fast_op = FastOp.registry["noise_update"]
    if impl in OURS and backend not in fast_op.available(device):
        pytest.fail(f"backend {backend} unavailable: {fast_op.why_unavailable(backend, device)}")
    run = setup_run(op, case, impl, paper_scale, device)
    # the result is checked before it is timed (eager-lean's ddim/ddpm and q_sample's eager
    # outputs through the eager sequence given the same noise)
    peak = check_then_time(
        benchmark, run, device=device, check=lambda: check(op, impl, run(), expected_result(op, case, paper_scale, device)),
        group=f"noise {op} {case} {'paper' if paper_scale else 'small'} {device} {torch.get_num_threads()}t",
        target="benchmarks.test_ops_noise_update:setup_run", kwargs=dict(op=op, case=case, impl=impl, paper=paper_scale),
        rounds=10 if paper_scale else 50, warmup_rounds=2)
    seconds = benchmark.stats.stats.min  # robust to other jobs on a shared machine
    key = (op, case, paper_scale, device)
    _SECONDS[key + (impl,)] = seconds
    moved = moved_bytes(op, case, paper_scale)
    info = benchmark.extra_info
    info.update(peak_bytes=peak, moved_bytes=moved, bandwidth_GBps=round(moved / seconds / 1e9, 2),
                threads=torch.get_num_threads())
    baselines = BASELINES if impl in OURS else ("eager", "eager-lean") if impl.startswith("compile") else ()
    for baseline in baselines:
        other = _SECONDS.get(key + (baseline,))
        if other is not None:
            info[f"speedup_vs_{baseline}"] = round(other / seconds, 2)
