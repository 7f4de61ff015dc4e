// The fused noise update and Philox noise on the CPU.
//
// Work is split over the flat element range (at::parallel_for); each task walks its range row
// by row (a row = one batch element, contiguous) in blocks of kBlock elements. Per block, the
// noise is drawn first into a small buffer that stays in L1 (Philox in groups of four, one
// vectorised loop), then one vectorised loop reads x and eps, and writes out and x0.
//
// The loops that do the arithmetic are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (GCC's target_clones), since the extension itself is built for the
// baseline only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../noise_update_args.h"
#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PATCHDDM_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PATCHDDM_SIMD_CLONES
#endif

namespace patchddm {
namespace {

constexpr int64_t kBlock = 1024;           // elements per block: the noise buffer is 4 KiB
constexpr int64_t kGroups = kBlock / 4 + 1;  // Philox groups a block can touch
constexpr int64_t kGrain = 16384;          // elements per task: amortises the fork

// Noise elements g .. g + n - 1 (n <= kBlock) of `seed`, written to buffer; returns where
// element g is (the buffer starts at the Philox group holding g). buffer: 4 * kGroups floats.
PATCHDDM_SIMD_CLONES
const float* normals(uint64_t seed, uint64_t g, int64_t n, float* buffer) {
  const uint64_t first = g >> 2;
  const int64_t groups = static_cast<int64_t>(((g + n + 3) >> 2) - first);
  // Lane-major first (a loop the compiler vectorises across groups), then interleaved.
  alignas(64) float lanes[4][kGroups];
#pragma omp simd
  for (int64_t j = 0; j < groups; ++j) {
    const philox::Normals z = philox::normal4(seed, first + j);
    lanes[0][j] = z.z0;
    lanes[1][j] = z.z1;
    lanes[2][j] = z.z2;
    lanes[3][j] = z.z3;
  }
  for (int64_t j = 0; j < groups; ++j) {
    buffer[4 * j] = lanes[0][j];
    buffer[4 * j + 1] = lanes[1][j];
    buffer[4 * j + 2] = lanes[2][j];
    buffer[4 * j + 3] = lanes[3][j];
  }
  return buffer + (g & 3);
}

// c ? a : b through a bit mask: both sides are computed, so compilers keep loops over it
// vectorised rather than branching (they will not speculate float arithmetic into a select).
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// How each dtype is loaded into and stored from its math type. Half and bfloat16 are
// converted with branch-free integer code (round to nearest even, as c10 rounds) because
// c10's conversions keep loops over them from vectorising.
struct Float32 {
  using storage = float;
  using acc = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct Float64 {
  using storage = double;
  using acc = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};
struct BFloat16 {
  using storage = uint16_t;
  using acc = float;
  static float load(uint16_t v) { return philox::bits_float(static_cast<uint32_t>(v) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = philox::float_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(select_bits((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));  // NaN
  }
};
struct Float16 {
  using storage = uint16_t;
  using acc = float;
  static float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t bits = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa
    const uint32_t exponent = bits & (0x7C00u << 13);
    const uint32_t normal = bits + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);  // inf and NaN: exponent 255
    // zero and subnormals: m 2^-24 = (2^-14 (1 + m / 1024)) - 2^-14, exactly
    const uint32_t tiny = philox::float_bits(philox::bits_float(bits + (113u << 23)) -
                                             philox::bits_float(113u << 23));
    const uint32_t magnitude =
        select_bits(exponent == (0x7C00u << 13), special, select_bits(exponent == 0, tiny, normal));
    return philox::bits_float(magnitude | sign);
  }
  static uint16_t store(float f) {
    const uint32_t u = philox::float_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // normal halves: rebias the exponent, round the 13 dropped bits to nearest even (a carry
    // into the exponent gives the next binade, or infinity)
    const uint32_t normal = (a - ((127u - 15u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14: adding 0.5 makes the float addition round to a multiple of 2^-24
    const uint32_t tiny = philox::float_bits(philox::bits_float(a) + 0.5f) - 0x3F000000u;
    const uint32_t big = select_bits(a > 0x7F800000u, 0x7E00u, 0x7C00u);  // NaN, or inf for |f| >= 2^16
    const uint32_t h = select_bits(a >= (143u << 23), big, select_bits(a < (113u << 23), tiny, normal));
    return static_cast<uint16_t>(h | sign);
  }
};

template <typename T> struct policy_of;
template <> struct policy_of<float> { using type = Float32; };
template <> struct policy_of<double> { using type = Float64; };
template <> struct policy_of<c10::BFloat16> { using type = BFloat16; };
template <> struct policy_of<c10::Half> { using type = Float16; };

template <typename A>
struct Coef {
  A a, b, c, d, e, s, lo, hi;
};

// One contiguous run of n elements:
//   x0 = a x + b eps, clamped to [lo, hi];  out = ((c x0 + d x) + e eps) + s z
// in the reference's order of operations. lo, hi = -inf, inf without clipping: the
// comparisons below then keep every value, NaN too. out / x0_out may be x or eps: each
// element is read before it is written.
template <typename P, bool kEps, bool kNoise, bool kX0>
PATCHDDM_SIMD_CLONES void update_run(const typename P::storage* x, const typename P::storage* eps,
                                     const float* z, typename P::storage* out,
                                     typename P::storage* x0_out, int64_t n, Coef<typename P::acc> k) {
  using A = typename P::acc;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A xv = P::load(x[i]);
    const A ev = kEps ? P::load(eps[i]) : A(0);
    A x0 = k.a * xv;
    if constexpr (kEps) x0 += k.b * ev;
    x0 = x0 < k.lo ? k.lo : (x0 > k.hi ? k.hi : x0);
    A o = k.c * x0 + k.d * xv;
    if constexpr (kEps) o += k.e * ev;
    if constexpr (kNoise) o += k.s * static_cast<A>(z[i]);
    out[i] = P::store(o);
    if constexpr (kX0) x0_out[i] = P::store(x0);
  }
}

template <typename P>
PATCHDDM_SIMD_CLONES void convert_run(const float* z, typename P::storage* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = P::store(static_cast<typename P::acc>(z[i]));
}

struct Rows {
  char* data;
  int64_t stride;  // bytes between batch elements
};

Rows rows_of(const at::Tensor& t) {
  return {static_cast<char*>(const_cast<void*>(t.const_data_ptr())), t.stride(0) * t.element_size()};
}

template <typename P, bool kEps, bool kNoise, bool kX0>
void noise_update_kernel(const NoiseUpdateArgs& a, const at::Tensor& x,
                         const std::optional<at::Tensor>& eps, const at::Tensor& coef, bool clip,
                         uint64_t seed, uint64_t offset, const at::Tensor& out,
                         const std::optional<at::Tensor>& x0_out) {
  using A = typename P::acc;
  using S = typename P::storage;
  // Coefficient rows, read once (float32 or float64) and applied in the math type.
  std::vector<Coef<A>> rows(static_cast<size_t>(coef.size(0)));
  const at::Tensor coef64 = coef.to(at::kDouble).contiguous();
  const double* c = coef64.const_data_ptr<double>();
  const A inf = std::numeric_limits<A>::infinity();
  for (size_t r = 0; r < rows.size(); ++r) {
    const double* v = c + r * kNoiseCoefficients;
    rows[r] = {static_cast<A>(v[0]), static_cast<A>(v[1]), static_cast<A>(v[2]), static_cast<A>(v[3]),
               static_cast<A>(v[4]), static_cast<A>(v[5]), clip ? A(-1) : -inf, clip ? A(1) : inf};
  }
  const Rows xr = rows_of(x), outr = rows_of(out);
  const Rows er = eps.has_value() ? rows_of(*eps) : Rows{nullptr, 0};
  const Rows x0r = x0_out.has_value() ? rows_of(*x0_out) : Rows{nullptr, 0};
  const int64_t inner = a.inner;
  at::parallel_for(0, a.batch * inner, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float buffer[4 * kGroups];
    const float* z = nullptr;
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / inner, j = i - b * inner;
      const int64_t n = std::min({end - i, inner - j, kBlock});
      if constexpr (kNoise) z = normals(seed, offset + static_cast<uint64_t>(i), n, buffer);
      auto at_row = [&](const Rows& r) { return reinterpret_cast<S*>(r.data + b * r.stride) + j; };
      update_run<P, kEps, kNoise, kX0>(at_row(xr), kEps ? at_row(er) : nullptr, z, at_row(outr),
                                       kX0 ? at_row(x0r) : nullptr, n,
                                       rows[a.shared_coef ? 0 : b]);
      i += n;
    }
  });
}

void noise_update_out_cpu(const at::Tensor& x, const std::optional<at::Tensor>& eps,
                          const at::Tensor& coef, bool clip, bool add_noise, int64_t seed,
                          int64_t offset, const at::Tensor& out,
                          const std::optional<at::Tensor>& x0_out) {
  constexpr const char* op = "patchddm::noise_update_out";
  const NoiseUpdateArgs a = check_noise_update(op, x, eps, coef, add_noise, seed, offset);
  check_noise_outputs(op, x, eps, out, x0_out);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_update_cpu", [&] {
    // The variants as compile-time flags, so that each inner loop is branch-free.
    using P = typename policy_of<scalar_t>::type;
    auto run = [&]<bool kEps, bool kNoise, bool kX0>() {
      noise_update_kernel<P, kEps, kNoise, kX0>(a, x, eps, coef, clip, seed, offset, out, x0_out);
    };
    const int variant = (eps.has_value() ? 4 : 0) | (add_noise ? 2 : 0) | (x0_out.has_value() ? 1 : 0);
    switch (variant) {
      case 0: run.template operator()<false, false, false>(); break;
      case 1: run.template operator()<false, false, true>(); break;
      case 2: run.template operator()<false, true, false>(); break;
      case 3: run.template operator()<false, true, true>(); break;
      case 4: run.template operator()<true, false, false>(); break;
      case 5: run.template operator()<true, false, true>(); break;
      case 6: run.template operator()<true, true, false>(); break;
      default: run.template operator()<true, true, true>(); break;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> noise_update_cpu(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& eps,
                                                    const at::Tensor& coef, bool clip,
                                                    bool add_noise, int64_t seed, int64_t offset,
                                                    bool want_x0) {
  constexpr const char* op = "patchddm::noise_update";
  check_float(op, "x", x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor x0 = want_x0 ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  noise_update_out_cpu(x, eps, coef, clip, add_noise, seed, offset, out,
                       want_x0 ? std::optional<at::Tensor>(x0) : std::nullopt);
  return {out, x0};
}

at::Tensor philox_normal_cpu(const at::Tensor& like, int64_t seed, int64_t offset) {
  constexpr const char* op = "patchddm::philox_normal";
  check_float(op, "like", like);
  check_seed_offset(op, seed, offset);
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_normal_cpu", [&] {
    using P = typename policy_of<scalar_t>::type;
    auto* data = reinterpret_cast<typename P::storage*>(out.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      alignas(64) float buffer[4 * kGroups];
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t m = std::min(end - i, kBlock);
        convert_run<P>(normals(seed, offset + static_cast<uint64_t>(i), m, buffer), data + i, m);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) {
  m.impl("noise_update", &noise_update_cpu);
  m.impl("noise_update_out", &noise_update_out_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace patchddm
