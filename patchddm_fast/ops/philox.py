"""The counter-based Gaussian noise that every backend draws inside its kernels.

Noise element i of a call keyed by (seed, offset) is z(seed, offset + i), where z(seed, g) is:

    counter = g // 4 (as two 32-bit words, low first), lane = g % 4
    key     = seed (as two 32-bit words, low first)
    w0..w3  = Philox4x32-10(counter, key)
    u_k     = ((w_k >> 9) + 1/2) / 2^23            uniform in (0, 1), exact in float32
    lanes 0, 1: sqrt(-2 ln u0) * (cos, sin)(2 pi u1)   (Box-Muller)
    lanes 2, 3: sqrt(-2 ln u2) * (cos, sin)(2 pi u3)

rounded to float32 (then to the output dtype), so four neighbouring elements share one
Philox evaluation, |z| < 5.8, the noise of a tensor does not depend on its memory layout, and
noise(seed, offset)[i] == noise(seed, 0)[offset + i]: calls that advance the offset by the
number of elements drawn never reuse noise.

The C++ and CUDA kernels (csrc/philox.h) and the Triton kernels (ops/triton/noise_update.py) all
evaluate ln, cos and sin with the same short float32 polynomials (the angle reduced exactly,
in integers), so they agree with each other and with this reference to a few float32 ulps
(|difference| < PHILOX_BACKEND_ATOL = 2e-6, in every output dtype: float64 noise holds the same
float32 values, so it is no closer). This module is the reference in plain PyTorch: Philox in int64
arithmetic on 32-bit words, the transcendental functions in float64, rounded once.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
# How far two backends' noise may differ, in any output dtype (float64 included: it holds the
# float32 values): a few float32 ulps of |z| < 5.8 (one ulp at 4 is 4.8e-7), from the kernels'
# float32 polynomials against the reference's float64 log / cos / sin (csrc/philox.h).
PHILOX_BACKEND_ATOL = 2e-6
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63 - 1


def check_seed_offset(op: str, seed: int, offset: int) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"{op}: {name} must lie in [0, 2^63), got {value}")


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    product = b * a  # < 2^64: wraps in int64 but keeps every bit
    return (product >> 32) & MASK32, product & MASK32


def philox4x32(counter: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 of 64-bit counters (int64 tensor) with the 64-bit key `seed`.

    Returns the four 32-bit output words, each an int64 tensor like counter.
    """
    c0, c1 = counter & MASK32, (counter >> 32) & MASK32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for round_ in range(PHILOX_ROUNDS):
        if round_:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """u = ((w >> 9) + 1/2) / 2^23 in float64 (exact), from 32-bit words held in int64."""
    return ((words >> 9).to(torch.float64) + 0.5) * 2.0**-23


def philox_normal_reference(numel: int, seed: int, offset: int = 0, device=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z(seed, offset + i) for i in range(numel), as a flat tensor: float32 values in `dtype`."""
    # g in [0, 2^64): int64 arithmetic wraps like the kernels' uint64, and the mask turns the
    # arithmetic shift into their logical one
    g = torch.arange(numel, dtype=torch.int64, device=device) + offset
    words = philox4x32((g >> 2) & (2**62 - 1), seed)
    lane = g & 3
    first = lane < 2
    u_radius = uniform_from_words(torch.where(first, words[0], words[2]))
    u_angle = uniform_from_words(torch.where(first, words[1], words[3]))
    radius = torch.sqrt(-2.0 * torch.log(u_radius))
    angle = (2.0 * math.pi) * u_angle
    z = radius * torch.where((lane & 1) == 0, torch.cos(angle), torch.sin(angle))
    return z.to(torch.float32).to(dtype)
