// The element loops of the noise update and Philox noise on the CPU (noise_update.cpp).
// Compiled once per instruction set through per_isa.h, inside a namespace of noise_update.cpp:
// this file includes nothing itself.

// Noise elements g .. g + n - 1 (n <= kBlock) of `seed`, written to buffer; returns where
// element g is (the buffer starts at the Philox group holding g). buffer: 4 * kGroups floats.
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

// One contiguous run of n elements:
//   x0 = a x + b eps, clamped to [lo, hi];  out = ((c x0 + d x) + e eps) + s z
// in the reference's order of operations. lo, hi = -inf, inf without clipping: the
// comparisons below then keep every value, NaN too. out / x0_out may be x or eps: each
// element is read before it is written.
template <typename P, bool kEps, bool kNoise, bool kX0>
void update_run(const typename P::storage* x, const typename P::storage* eps, const float* z,
                typename P::storage* out, typename P::storage* x0_out, int64_t n, Coef<typename P::acc> k) {
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
void convert_run(const float* z, typename P::storage* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = P::store(static_cast<typename P::acc>(z[i]));
}
