"""The counter-based Gaussian noise that every backend draws inside its kernels.

Noise element i of a call keyed by (seed, offset) is z(seed, offset + i), where z(seed, g) is:

    counter = g // 4 (as two 32-bit words, low first), lane = g % 4
    key     = seed (as two 32-bit words, low first)
    w0..w3  = Philox4x32-10(counter, key)
    u_k     = ((w_k >> 8) + 0.5) / 2^24              uniform in (0, 1), exact in float32
    lanes 0, 1: sqrt(-2 log u0) * (cos, sin)(2 pi u1)   (Box-Muller)
    lanes 2, 3: sqrt(-2 log u2) * (cos, sin)(2 pi u3)

so four neighbouring elements share one Philox evaluation, the noise of a tensor does not
depend on its memory layout, and noise(seed, offset)[i] == noise(seed, 0)[offset + i]: calls
that advance the offset by the number of elements drawn never reuse noise. The C++, CUDA and
Triton kernels implement exactly this; they differ only in the last bits of log, cos and sin.
This module is the reference in plain PyTorch (int64 arithmetic on 32-bit words).
"""

from __future__ import annotations

import math

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
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


def philox_normal_reference(numel: int, seed: int, offset: int = 0, device=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z(seed, offset + i) for i in range(numel), as a flat tensor, computed in float32."""
    g = torch.arange(numel, dtype=torch.int64, device=device) + offset
    words = philox4x32(g >> 2, seed)
    lane = g & 3
    first = lane < 2
    w_radius = torch.where(first, words[0], words[2])
    w_angle = torch.where(first, words[1], words[3])
    scale = 1.0 / 16777216.0  # 2^-24
    u_radius = ((w_radius >> 8).to(torch.float32) + 0.5) * scale
    u_angle = ((w_angle >> 8).to(torch.float32) + 0.5) * scale
    radius = torch.sqrt(-2.0 * torch.log(u_radius))
    angle = (2.0 * math.pi) * u_angle
    z = radius * torch.where((lane & 1) == 0, torch.cos(angle), torch.sin(angle))
    return z.to(dtype)
