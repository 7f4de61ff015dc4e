// The counter-based Gaussian noise of every patchddm kernel, shared by the CPU and CUDA code
// (and mirrored by the Triton kernels and the PyTorch reference, patchddm_fast/ops/philox.py,
// which states the spec). Noise element g of the key `seed` is
//
//   w0..w3 = Philox4x32-10(counter = g / 4, key = seed)
//   k_i    = w_i >> 9                            (23 random bits)
//   u_i    = (k_i + 1/2) / 2^23                  in (0, 1), exact in float32
//   lanes 0, 1 of the group: sqrt(-2 ln u0) * (cos, sin)(2 pi u1)
//   lanes 2, 3:              sqrt(-2 ln u2) * (cos, sin)(2 pi u3)
//
// in float32. ln, sin and cos are short polynomials written out here rather than each
// platform's libm, so that every backend runs the same arithmetic: they agree to a few
// float32 ulps. The angle is reduced exactly in integers (the quadrant comes from k's top
// bits), so no accuracy is lost to a rounded 2 pi.
#pragma once

#include <cstdint>
#include <cstring>

// The same definition as coord_value.h's: host+device under nvcc, plain inline elsewhere.
#ifndef PATCHDDM_HOST_DEVICE
#if defined(__CUDACC__)
#define PATCHDDM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PATCHDDM_HOST_DEVICE inline
#endif
#endif

namespace patchddm::philox {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
constexpr int kRounds = 10;
constexpr int kLanes = 4;  // normals per Philox evaluation

PATCHDDM_HOST_DEVICE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

PATCHDDM_HOST_DEVICE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

PATCHDDM_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Four 32-bit words or four floats. Plain structs rather than arrays: compilers keep their
// fields in registers, which lets a loop over them vectorise.
struct Words {
  uint32_t w0, w1, w2, w3;
};
struct Normals {
  float z0, z1, z2, z3;
};

// Philox4x32-10 (Salmon et al., SC'11) of the 128-bit counter (counter, 0) and 64-bit key.
PATCHDDM_HOST_DEVICE Words philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10  // a loop-free body lets the caller's loop vectorise
#endif
  for (int r = 0; r < kRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{c0, c1, c2, c3};
}

// sqrt(y) for y > 0. On the host, from the classic bit-trick estimate of 1/sqrt(y), three
// Newton steps and a final correction (within 1 ulp of sqrtf): a libm sqrtf call that may
// set errno would keep compilers (without -fno-math-errno) from vectorising loops over it.
PATCHDDM_HOST_DEVICE float sqrt_positive(float y) {
#if defined(__CUDA_ARCH__)
  return sqrtf(y);
#else
  float r = bits_float(0x5F375A86u - (float_bits(y) >> 1));
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  const float s = y * r;
  return s + 0.5f * r * (y - s * s);
#endif
}

// sqrt(-2 ln u) for u = (k + 1/2) / 2^23, k = word >> 9.
// ln u = e ln 2 + ln m with m in [sqrt(1/2), sqrt(2)), and ln m = 2 atanh(s), s = (m-1)/(m+1),
// |s| < 0.172, by its odd series to s^9 (truncation error < 1e-9).
PATCHDDM_HOST_DEVICE float box_muller_radius(uint32_t word) {
  const float u = (static_cast<float>(word >> 9) + 0.5f) * 0x1p-23f;
  const uint32_t bits = float_bits(u);
  // m = the mantissa as a float in [1, 2), halved when above sqrt(2) (mantissa bits 0x3504F3);
  // integer selects keep the code branch-free
  const uint32_t mantissa = bits & 0x007FFFFFu;
  const uint32_t above = mantissa > 0x003504F3u ? 1u : 0u;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(above);
  const float m = bits_float(mantissa | (0x3F800000u - (above << 23)));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  const float ln_u = static_cast<float>(e) * 0.693147181f + 2.0f * s * series;
  return sqrt_positive(-2.0f * ln_u);
}

// (cos, sin)(2 pi u) for u = (k + 1/2) / 2^23, k = word >> 9. With q = round(4u) (the
// quadrant) and r = 4u - q in [-1/2, 1/2], both exact in integers: 2 pi u = q pi/2 + t,
// t = r pi/2 in [-pi/4, pi/4], where Taylor series to t^9 (sin) and t^10 (cos) are
// accurate to 2e-9.
PATCHDDM_HOST_DEVICE void box_muller_angle(uint32_t word, float& cos_out, float& sin_out) {
  const int32_t k = static_cast<int32_t>(word >> 9);
  const int32_t q = (k + (1 << 20)) >> 21;  // 0..4
  const float r = (static_cast<float>(k - (q << 21)) + 0.5f) * 0x1p-21f;
  const float t = r * 1.57079633f;
  const float t2 = t * t;
  const float sin_t =
      t * (1.0f + t2 * (-1.0f / 6 + t2 * (1.0f / 120 + t2 * (-1.0f / 5040 + t2 * (1.0f / 362880)))));
  const float cos_t =
      1.0f + t2 * (-0.5f + t2 * (1.0f / 24 +
                                 t2 * (-1.0f / 720 + t2 * (1.0f / 40320 + t2 * (-1.0f / 3628800)))));
  // rotate by q quarter turns, (cos, sin) -> (-sin, cos) each, with bit masks rather than
  // branches so that loops over this vectorise
  const uint32_t odd = 0u - static_cast<uint32_t>(q & 1);              // swap cos and sin
  const uint32_t cos_sign = static_cast<uint32_t>((q + 1) & 2) << 30;  // negate cos
  const uint32_t sin_sign = static_cast<uint32_t>(q & 2) << 30;        // negate sin
  const uint32_t cb = float_bits(cos_t), sb = float_bits(sin_t);
  cos_out = bits_float(((sb & odd) | (cb & ~odd)) ^ cos_sign);
  sin_out = bits_float(((cb & odd) | (sb & ~odd)) ^ sin_sign);
}

// The four normals of counter `counter` (elements 4 * counter .. 4 * counter + 3).
PATCHDDM_HOST_DEVICE Normals normal4(uint64_t seed, uint64_t counter) {
  const Words w = philox4x32_10(counter, seed);
  float c01, s01, c23, s23;
  box_muller_angle(w.w1, c01, s01);
  box_muller_angle(w.w3, c23, s23);
  const float r01 = box_muller_radius(w.w0), r23 = box_muller_radius(w.w2);
  return Normals{r01 * c01, r01 * s01, r23 * c23, r23 * s23};
}

PATCHDDM_HOST_DEVICE float lane(const Normals& n, int i) {
  return i == 0 ? n.z0 : i == 1 ? n.z1 : i == 2 ? n.z2 : n.z3;
}

// Element g alone (tails and tests): one Philox evaluation per call.
PATCHDDM_HOST_DEVICE float normal_at(uint64_t seed, uint64_t g) {
  return lane(normal4(seed, g >> 2), static_cast<int>(g & 3));
}

}  // namespace patchddm::philox
