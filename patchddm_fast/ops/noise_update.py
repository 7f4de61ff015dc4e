"""The per-timestep noise update of diffusion sampling and training, as one fused pass.

Every update is an instance of one kernel, per batch element b with coef[b] = (a, b, c, d, e, s):

    x0  = a * x + b * eps                       (clamped to [-1, 1] when clip)
    out = c * x0 + d * x + e * eps + s * z      (z: in-kernel Philox noise, see philox.py)

- ddim_step: the DDIM update (eta >= 0), returning x_prev and the predicted x0;
- ddpm_step: the ancestral DDPM update (posterior mean plus sigma * z);
- q_sample:  forward noising for training, x_t = sqrt(ab) * x0 + sqrt(1 - ab) * z.

Coefficients may be Python floats or per-batch-element tensors (ensembles, random training
timesteps); they are computed in float64 and rounded to float32 once (the arithmetic on the
data runs in float32, float64 for float64 data).
`out=` may be a strided view, e.g. the x_t channel of a preallocated model-input buffer,
and may alias x: each element is read before it is written.

These ops have no autograd: sampling runs without gradients, and training noises its data,
which needs none.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from .._extension import EXTENSION
from ._backends import FastOp
from ._checks import FLOAT_DTYPES, check_like, check_tensor, opmath_dtype
from .philox import check_seed_offset, philox_normal_reference

OP = FastOp("noise_update", native="noise_update")
NCOEF = 6


# -- the generic update -----------------------------------------------------------------------

def noise_update_reference(x: torch.Tensor, eps: torch.Tensor | None, coef: torch.Tensor, clip: bool,
                           add_noise: bool, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch noise update: returns (out, x0), both in x's dtype."""
    acc = opmath_dtype(x.dtype)
    shape = (coef.shape[0],) + (1,) * (x.dim() - 1)
    a, b, c, d, e, s = (coef[:, k].to(device=x.device, dtype=acc).reshape(shape) for k in range(NCOEF))
    xf = x.to(acc)
    x0 = a * xf
    if eps is not None:
        x0 = x0 + b * eps.to(acc)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = c * x0 + d * xf
    if eps is not None:
        out = out + e * eps.to(acc)
    if add_noise:
        z = philox_normal_reference(x.numel(), seed, offset, device=x.device, dtype=acc)
        out = out + s * z.reshape(x.shape)
    return out.to(x.dtype), x0.to(x.dtype)


def _is_batch_strided(t: torch.Tensor) -> bool:
    """Contiguous within each batch element; the batch stride may be anything (a channel
    slice of a larger buffer qualifies). That is the layout the kernels read and write."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_arguments(name: str, x: torch.Tensor, eps: torch.Tensor | None, coef: torch.Tensor, add_noise: bool,
                    seed: int, offset: int, out: torch.Tensor | None = None, x0_out: torch.Tensor | None = None,
                    *, kernel_layout: bool = False) -> None:
    """The checks of every noise_update backend (csrc/noise_update_args.h makes the same for the
    C++ and CUDA kernels). The public ops fix the layout themselves afterwards; the Triton ops
    ask for kernel_layout: every tensor contiguous within each batch element, out and x0_out
    distinct."""
    check_tensor(name, "x", x, min_ndim=1)
    tensors = [(label, t) for label, t in (("eps", eps), ("out", out), ("x0_out", x0_out)) if t is not None]
    for label, t in tensors:
        check_like(name, label, t, x, "x")
    batch = x.shape[0]
    if not (isinstance(coef, torch.Tensor) and coef.device in (x.device, torch.device("cpu"))
            and coef.dtype in (torch.float32, torch.float64) and coef.dim() == 2 and coef.shape[1] == NCOEF
            and coef.shape[0] in (1, batch)):
        got = (f"shape {tuple(coef.shape)}, {coef.dtype}, on {coef.device}" if isinstance(coef, torch.Tensor)
               else type(coef).__name__)
        raise ValueError(f"{name}: coef must have shape (1, 6) or (B, 6) with B = {batch}, float32 or float64, "
                         f"on the CPU or {x.device}; got {got}")
    if add_noise:
        check_seed_offset(name, seed, offset)
    if not kernel_layout:
        return
    for label, t in [("x", x)] + tensors:
        if not _is_batch_strided(t):
            raise ValueError(f"{name}: {label} must be contiguous within each batch element "
                             f"({label}[b].is_contiguous()); got shape {tuple(t.shape)} and strides {t.stride()}")
    if out is not None and x0_out is not None and out.numel() and out.data_ptr() == x0_out.data_ptr():
        raise ValueError(f"{name}: out and x0_out must be different tensors")


def check_step_arguments(name: str, x_t, eps) -> None:
    """The checks of ddim_step and ddpm_step before their coefficients: a sampling step needs the
    network's noise prediction (noise_update's eps=None, "no eps term", is not a step)."""
    check_tensor(name, "x_t", x_t, min_ndim=1)
    if eps is None:
        raise TypeError(f"{name}: eps (the network's noise prediction) is required, got None")
    check_like(name, "eps", eps, x_t, "x_t")


def check_philox_normal(name: str, dtype: torch.dtype, seed: int, offset: int) -> None:
    """The checks of every philox_normal backend."""
    check_seed_offset(name, seed, offset)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be a float dtype (float32, float16, bfloat16 or float64), got {dtype}")


def _noise_update(name: str, x: torch.Tensor, eps: torch.Tensor | None, coef: torch.Tensor, *, clip: bool,
                  add_noise: bool, seed: int, offset: int, out: torch.Tensor | None, x0_out: torch.Tensor | None,
                  backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_arguments(name, x, eps, coef, add_noise, seed, offset, out, x0_out)
    if not add_noise:
        seed, offset = 0, 0
    choice = OP.resolve(x.device, backend)
    if choice == "torch":
        result, x0 = noise_update_reference(x, eps, coef, clip, add_noise, seed, offset)
        if out is not None:
            out.copy_(result)
            result = out
        if x0_out is not None:
            x0_out.copy_(x0)
            x0 = x0_out
        return result, x0
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    x_in = x if _is_batch_strided(x) else x.contiguous()
    eps_in = None if eps is None else (eps if _is_batch_strided(eps) else eps.contiguous())
    if out is None and x0_out is None:
        return ops.noise_update(x_in, eps_in, coef, clip, add_noise, seed, offset, True)
    # Write straight into the caller's buffers where the kernels can; else via a temporary.
    direct_out = out if out is not None and _is_batch_strided(out) else torch.empty_like(x_in)
    direct_x0 = x0_out if x0_out is not None and _is_batch_strided(x0_out) else torch.empty_like(x_in)
    ops.noise_update_out(x_in, eps_in, coef, clip, add_noise, seed, offset, direct_out, direct_x0)
    if out is not None and direct_out is not out:
        out.copy_(direct_out)
    if x0_out is not None and direct_x0 is not x0_out:
        x0_out.copy_(direct_x0)
    return (out if out is not None else direct_out), (x0_out if x0_out is not None else direct_x0)


# -- coefficients -------------------------------------------------------------------------------
#
# Coefficients are combined on the host in float64 and handed to the kernels as one (1 or B, 6)
# float32 CPU tensor, which the CUDA and Triton hosts pass on without a device sync. Each op
# writes its coefficients as one row function of its per-element values; eager calls evaluate
# it on Python floats (per batch element: a few microseconds, where a dozen tiny tensor ops
# would take hundreds), traced calls on float64 tensors, which torch.compile records.

def _per_batch(name: str, label: str, value: float | torch.Tensor, batch: int) -> float | list[float] | torch.Tensor:
    """A coefficient as a Python float or a list of `batch` floats; while torch.compile
    traces, a tensor argument stays a float64 CPU tensor of shape (batch,) or (1,)."""
    if isinstance(value, torch.Tensor):
        v = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if v.numel() not in (1, batch):
            raise ValueError(f"{name}: {label} has {v.numel()} values; expected 1 or the batch size {batch}")
        if torch.compiler.is_compiling():
            return v
        values = v.tolist()
        return values[0] if len(values) == 1 else values
    return float(value)


def _sqrt(v: float | torch.Tensor) -> float | torch.Tensor:
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def _nonnegative(v: float | torch.Tensor) -> float | torch.Tensor:
    return v.clamp(min=0) if isinstance(v, torch.Tensor) else max(v, 0.0)


def _check_alpha_bar(name: str, label: str, v: float | list[float] | torch.Tensor, *, allow_one: bool) -> None:
    if isinstance(v, torch.Tensor):
        return  # traced by torch.compile: a value check would break the graph; eager calls check
    values = v if isinstance(v, list) else [v]
    if not all(a > 0 and (a <= 1 if allow_one else a < 1) for a in values):  # False for NaN
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name}: {label} must lie in {bound} (NaN is invalid), got {values}")


def _coefficients(row: Callable[..., list], *values) -> torch.Tensor:
    """The (1 or B, 6) float32 CPU rows of row(*values) (floats, lists of B floats, or
    float64 tensors while tracing) per batch element."""
    if any(isinstance(v, torch.Tensor) for v in values):
        columns = [c if isinstance(c, torch.Tensor) else torch.tensor([c], dtype=torch.float64)
                   for c in row(*values)]
        return torch.stack(torch.broadcast_tensors(*columns), dim=1).to(torch.float32)
    lists = [v if isinstance(v, list) else [v] for v in values]
    count = max(len(v) for v in lists)
    rows = [row(*(v[i] if len(v) > 1 else v[0] for v in lists)) for i in range(count)]
    return torch.tensor(rows, dtype=torch.float32)


def _seed_or_random(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return seed


# -- public ops ---------------------------------------------------------------------------------

def _step_alpha_bars(name: str, x_t: torch.Tensor, alpha_bar_t: float | torch.Tensor,
                     alpha_bar_prev: float | torch.Tensor) -> tuple:
    """ab_t in (0, 1) and ab_prev in (0, 1] of a sampling step, as _per_batch gives them."""
    batch = x_t.shape[0]
    ab_t = _per_batch(name, "alpha_bar_t", alpha_bar_t, batch)
    ab_prev = _per_batch(name, "alpha_bar_prev", alpha_bar_prev, batch)
    _check_alpha_bar(name, "alpha_bar_t", ab_t, allow_one=False)
    _check_alpha_bar(name, "alpha_bar_prev", ab_prev, allow_one=True)
    return ab_t, ab_prev


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float | torch.Tensor,
              alpha_bar_prev: float | torch.Tensor, *, eta: float = 0.0, clip: bool = False, seed: int | None = None,
              offset: int = 0, out: torch.Tensor | None = None, x0_out: torch.Tensor | None = None,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021) from x_t and the predicted noise eps.

        x0     = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)        (clamped to [-1, 1] if clip)
        eps'   = (x_t - sqrt(ab_t) * x0) / sqrt(1 - ab_t)         (eps itself when not clipped)
        sigma  = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
        x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps' + sigma * z

    x_t, eps: (B, ...) tensors of one shape and dtype. alpha_bar_t, alpha_bar_prev: floats or
    tensors of B (or 1) values, ab_t in (0, 1), ab_prev in (0, 1]. z is Philox noise keyed by
    (seed, offset), drawn only when eta > 0 (seed None: one drawn from torch's generator).
    Returns (x_prev, x0); written into out / x0_out when given (any strides; out may be x_t).
    """
    name = "ddim_step"
    check_step_arguments(name, x_t, eps)
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"{name}: eta must be a number, got {type(eta).__name__} {eta!r}")
    if not eta >= 0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta} (0: deterministic DDIM)")
    if not math.isfinite(eta):  # sigma would be infinite and the step NaN
        raise ValueError(f"{name}: eta must be finite, got {eta}")
    ab_t, ab_prev = _step_alpha_bars(name, x_t, alpha_bar_t, alpha_bar_prev)

    def row(ab_t, ab_prev):
        sqrt_ab, sqrt_1m_ab = _sqrt(ab_t), _sqrt(1 - ab_t)
        sigma = eta * _sqrt((1 - ab_prev) / (1 - ab_t)) * _sqrt(_nonnegative(1 - ab_t / ab_prev))
        k = _sqrt(_nonnegative(1 - ab_prev - sigma**2))
        # x_prev = sqrt(ab_prev) x0 + k (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t) + sigma z
        return [1 / sqrt_ab, -sqrt_1m_ab / sqrt_ab, _sqrt(ab_prev) - k * sqrt_ab / sqrt_1m_ab, k / sqrt_1m_ab,
                0.0, sigma]

    coef = _coefficients(row, ab_t, ab_prev)
    add_noise = eta > 0
    return _noise_update(name, x_t, eps, coef, clip=clip, add_noise=add_noise,
                         seed=_seed_or_random(seed) if add_noise else 0, offset=offset,
                         out=out, x0_out=x0_out, backend=backend)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float | torch.Tensor,
              alpha_bar_prev: float | torch.Tensor, *, clip: bool = True, variance: str = "fixed_small",
              seed: int | None = None, offset: int = 0, out: torch.Tensor | None = None,
              x0_out: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step (Ho et al. 2020) from x_t and the predicted noise eps.

        x0     = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)        (clamped to [-1, 1] if clip)
        beta   = 1 - ab_t / ab_prev
        mean   = beta sqrt(ab_prev) / (1 - ab_t) * x0 + (1 - ab_prev) sqrt(1 - beta) / (1 - ab_t) * x_t
        x_prev = mean + sigma * z,  sigma^2 = beta (1 - ab_prev) / (1 - ab_t)  ("fixed_small")
                                    or beta                                  ("fixed_large")

    The last step (ab_prev = 1) adds no noise. Arguments and returns as ddim_step.
    """
    name = "ddpm_step"
    check_step_arguments(name, x_t, eps)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"{name}: variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    ab_t, ab_prev = _step_alpha_bars(name, x_t, alpha_bar_t, alpha_bar_prev)

    def row(ab_t, ab_prev):
        beta = _nonnegative(1 - ab_t / ab_prev)
        c_x0 = beta * _sqrt(ab_prev) / (1 - ab_t)
        c_xt = (1 - ab_prev) * _sqrt(1 - beta) / (1 - ab_t)
        var = beta * (1 - ab_prev) / (1 - ab_t) if variance == "fixed_small" else beta
        sigma = _sqrt(var) * (ab_prev < 1)  # the last step (ab_prev = 1) adds no noise
        sqrt_ab = _sqrt(ab_t)
        return [1 / sqrt_ab, -_sqrt(1 - ab_t) / sqrt_ab, c_x0, c_xt, 0.0, sigma]

    coef = _coefficients(row, ab_t, ab_prev)
    return _noise_update(name, x_t, eps, coef, clip=clip, add_noise=True, seed=_seed_or_random(seed),
                         offset=offset, out=out, x0_out=x0_out, backend=backend)


def q_sample(x0: torch.Tensor, alpha_bar: float | torch.Tensor, *, seed: int | None = None, offset: int = 0,
             return_noise: bool = True, out: torch.Tensor | None = None,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Forward noising for training: x_t = sqrt(ab) * x0 + sqrt(1 - ab) * z.

    x0: (B, ...) clean data; alpha_bar: float or B values in (0, 1). z is Philox noise keyed by
    (seed, offset) (seed None: one drawn from torch's generator). Returns (x_t, z) with
    return_noise, else x_t alone: the loss can regenerate the same z later with
    philox_normal(x0.shape, seed, offset) instead of keeping it alive through the forward.
    With return_noise, z is drawn once in x0's dtype and x_t combines that z; for float32 and
    float64 that x_t is bit for bit the x_t of return_noise=False (which uses z in float32).
    """
    name = "q_sample"
    check_tensor(name, "x0", x0, min_ndim=1)
    ab = _per_batch(name, "alpha_bar", alpha_bar, x0.shape[0])
    _check_alpha_bar(name, "alpha_bar", ab, allow_one=False)
    seed = _seed_or_random(seed)
    check_seed_offset(name, seed, offset)
    if not return_noise:  # the noise is drawn inside the update
        coef = _coefficients(lambda a: [1.0, 0.0, _sqrt(a), 0.0, 0.0, _sqrt(1 - a)], ab)
        x_t, _ = _noise_update(name, x0, None, coef, clip=False, add_noise=True, seed=seed, offset=offset,
                               out=out, x0_out=None, backend=backend)
        return x_t
    # The noise is wanted too: draw it once, then combine it as eps (the kernels' order of
    # operations makes this the same arithmetic as drawing it inside).
    z = philox_normal(x0.shape, seed, offset, dtype=x0.dtype, device=x0.device, backend=backend)
    coef = _coefficients(lambda a: [1.0, 0.0, _sqrt(a), 0.0, _sqrt(1 - a), 0.0], ab)
    x_t, _ = _noise_update(name, x0, z, coef, clip=False, add_noise=False, seed=seed, offset=offset,
                           out=out, x0_out=None, backend=backend)
    return x_t, z


def philox_normal(shape: Sequence[int], seed: int, offset: int = 0, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None, backend: str | None = None) -> torch.Tensor:
    """Standard normal noise of `shape`: element i (row-major) is z(seed, offset + i).

    The same (seed, offset) gives the same noise that ddim_step / ddpm_step / q_sample draw, and
    nearly the same values on every backend and device: the values are float32 whatever the
    dtype (float64 output holds them exactly), and the kernels' float32 polynomials for
    log / cos / sin differ from the reference's float64 functions by a few float32 ulps, so
    backends agree to within PHILOX_BACKEND_ATOL = 2e-6 absolute (|z| < 5.8), not bit for bit.
    """
    name = "philox_normal"
    check_philox_normal(name, dtype, seed, offset)
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    choice = OP.resolve(device, backend)
    if choice == "torch":
        numel = math.prod(shape)
        return philox_normal_reference(numel, seed, offset, device=device,
                                       dtype=opmath_dtype(dtype)).reshape(shape).to(dtype)
    # `like` carries shape, dtype and device only: an expanded scalar allocates nothing.
    like = torch.empty((), dtype=dtype, device=device).expand(shape)
    ops = torch.ops.patchddm_triton if choice == "triton" else torch.ops.patchddm
    return ops.philox_normal(like, seed, offset)


# -- fake kernels -------------------------------------------------------------------------------

def fake_noise_update(x: torch.Tensor, eps: torch.Tensor | None, coef: torch.Tensor, clip: bool, add_noise: bool,
                      seed: int, offset: int, want_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.empty_like(x, memory_format=torch.contiguous_format) if want_x0 else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), x0


def fake_noise_update_out(x: torch.Tensor, eps: torch.Tensor | None, coef: torch.Tensor, clip: bool,
                          add_noise: bool, seed: int, offset: int, out: torch.Tensor,
                          x0_out: torch.Tensor | None) -> None:
    return None


def fake_philox_normal(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


if EXTENSION.loaded:
    torch.library.register_fake("patchddm::noise_update")(fake_noise_update)
    torch.library.register_fake("patchddm::noise_update_out")(fake_noise_update_out)
    torch.library.register_fake("patchddm::philox_normal")(fake_philox_normal)
