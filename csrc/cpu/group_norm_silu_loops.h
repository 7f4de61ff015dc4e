// The element loops of GroupNorm + SiLU on the CPU (group_norm_silu.cpp), each over one span
// of one channel. Compiled once per instruction set through per_isa.h, inside a namespace of
// group_norm_silu.cpp: this file includes nothing itself.

// -- sigmoid ----------------------------------------------------------------------------------

// exp(x) = 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-5 polynomial fitted to
// exp there (relative error 1e-7, then float rounding). x is clamped to [-86, 86], which keeps
// 2^n a normal float; sigmoid needs no wider range: beyond it the result is 0 or 1 to float
// precision. The clamps are bit selects: GCC keeps a float `?:` as a branch for AVX2 and SSE2
// (only AVX-512's masks if-convert it), and a branch in the loop stops its vectorisation there
// (measured: the AVX2 loops ran 6-8x slower than the AVX-512 ones, slower than eager PyTorch).
// A NaN input gives a finite value here and the NaN comes through z in the callers.
PATCHDDM_INLINE float exp_clamped(float x) {
  x = bits_float(select_bits(x > -86.f, float_bits(x), float_bits(-86.f)));
  x = bits_float(select_bits(x < 86.f, float_bits(x), float_bits(86.f)));
  const float round = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504f + round;
  const int32_t n_bits = std::bit_cast<int32_t>(t) - 0x4B400000;  // n as an integer
  const float n = t - round;
  float r = x - n * 0.693145752f;  // ln2 in two parts, so r is exact to float
  r -= n * 1.42860677e-6f;
  float p = 0.00826153066f;
  p = p * r + 0.0418987311f;
  p = p * r + 0.166681141f;
  p = p * r + 0.499991417f;
  p = p * r + 0.999999523f;
  p = p * r + 1.f;
  return std::bit_cast<float>(std::bit_cast<int32_t>(p) + (n_bits << 23));
}

PATCHDDM_INLINE float sigmoid(float z) { return 1.f / (1.f + exp_clamped(-z)); }
PATCHDDM_INLINE double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
PATCHDDM_INLINE float silu(float z) { return z / (1.f + exp_clamped(-z)); }
PATCHDDM_INLINE double silu(double z) { return z / (1.0 + std::exp(-z)); }

// -- the element loops, each over one span of one channel ------------------------------------

// Sums of (a - shift) and its square over a span; a = x, or the average (x + skip) / 2 rounded
// to T, which is also written to avg.
template <typename T>
void stats_span(const typename Elem<T>::storage* __restrict x,
                                const typename Elem<T>::storage* __restrict skip,
                                typename Elem<T>::storage* __restrict avg, int64_t n,
                                typename Elem<T>::acc shift, double* __restrict sums) {
  using E = Elem<T>;
  using acc = typename E::acc;
  double sum = 0, sum_sq = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(n, t0 + kTile);
    acc s = 0, q = 0;
    if (skip != nullptr) {
#pragma omp simd reduction(+ : s, q)
      for (int64_t i = t0; i < t1; ++i) {
        const auto rounded = E::store((E::load(x[i]) + E::load(skip[i])) * acc(0.5));
        avg[i] = rounded;
        const acc d = E::load(rounded) - shift;
        s += d;
        q += d * d;
      }
    } else {
#pragma omp simd reduction(+ : s, q)
      for (int64_t i = t0; i < t1; ++i) {
        const acc d = E::load(x[i]) - shift;
        s += d;
        q += d * d;
      }
    }
    sum += s;
    sum_sq += q;
  }
  sums[0] = sum;
  sums[1] = sum_sq;
}

// y = silu(a * scale + shift): the whole normalisation and affine folded into two constants.
template <typename T>
void apply_span(const typename Elem<T>::storage* __restrict a,
                                typename Elem<T>::storage* __restrict y, int64_t n,
                                typename Elem<T>::acc scale, typename Elem<T>::acc shift) {
  using E = Elem<T>;
  using acc = typename E::acc;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc z = E::load(a[i]) * scale + shift;
    y[i] = E::store(silu(z));
  }
}

// The derivative of silu at z = xhat * w + b, xhat = a * rstd + q, times dy.
template <typename T>
PATCHDDM_INLINE typename Elem<T>::acc grad_z(typename Elem<T>::acc dy, typename Elem<T>::acc z) {
  using acc = typename Elem<T>::acc;
  const acc sig = sigmoid(z);
  return dy * sig * (acc(1) + z * (acc(1) - sig));
}

// Sums over a span of dz, dz * xhat and xhat (the last only matters for grad_add); with KEEP,
// dz is also written to dz_out.
template <typename T, bool KEEP>
void grad_stats_span(const typename Elem<T>::storage* __restrict dy,
                                     const typename Elem<T>::storage* __restrict a,
                                     typename Elem<T>::acc* __restrict dz_out, int64_t n,
                                     typename Elem<T>::acc rstd, typename Elem<T>::acc q,
                                     typename Elem<T>::acc w, typename Elem<T>::acc b,
                                     double* __restrict sums) {
  using E = Elem<T>;
  using acc = typename E::acc;
  double sum_dz = 0, sum_dz_xhat = 0, sum_xhat = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(n, t0 + kTile);
    acc s1 = 0, s2 = 0, s0 = 0;
#pragma omp simd reduction(+ : s1, s2, s0)
    for (int64_t i = t0; i < t1; ++i) {
      const acc xhat = E::load(a[i]) * rstd + q;
      const acc dz = grad_z<T>(E::load(dy[i]), xhat * w + b);
      if constexpr (KEEP) dz_out[i] = dz;
      s1 += dz;
      s2 += dz * xhat;
      s0 += xhat;
    }
    sum_dz += s1;
    sum_dz_xhat += s2;
    sum_xhat += s0;
  }
  sums[0] = sum_dz;
  sums[1] = sum_dz_xhat;
  sums[2] = sum_xhat;
}

// grad = scale_in * (c1 * dz + c2 * xhat + c3 + grad_average), in place over the kept dz.
template <typename T>
void grad_apply_kept_span(const typename Elem<T>::storage* __restrict a,
                                          const typename Elem<T>::storage* __restrict grad_avg,
                                          typename Elem<T>::acc* __restrict grad, int64_t n,
                                          typename Elem<T>::acc rstd, typename Elem<T>::acc q,
                                          typename Elem<T>::acc c1, typename Elem<T>::acc c2,
                                          typename Elem<T>::acc c3, typename Elem<T>::acc scale_in) {
  using acc = typename Elem<T>::acc;
  if (grad_avg != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      grad[i] = scale_in * (c1 * grad[i] + c2 * (static_cast<acc>(a[i]) * rstd + q) + c3 + grad_avg[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) grad[i] = scale_in * (c1 * grad[i] + c2 * (static_cast<acc>(a[i]) * rstd + q) + c3);
  }
}

// grad_input = scale_in * (c1 * dz + c2 * xhat + c3 + grad_average).
template <typename T>
void grad_apply_span(const typename Elem<T>::storage* __restrict dy,
                                     const typename Elem<T>::storage* __restrict a,
                                     const typename Elem<T>::storage* __restrict grad_avg,
                                     typename Elem<T>::storage* __restrict grad_in, int64_t n,
                                     typename Elem<T>::acc rstd, typename Elem<T>::acc q,
                                     typename Elem<T>::acc w, typename Elem<T>::acc b,
                                     typename Elem<T>::acc c1, typename Elem<T>::acc c2,
                                     typename Elem<T>::acc c3, typename Elem<T>::acc scale_in) {
  using E = Elem<T>;
  using acc = typename E::acc;
  if (grad_avg != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc xhat = E::load(a[i]) * rstd + q;
      const acc dz = grad_z<T>(E::load(dy[i]), xhat * w + b);
      grad_in[i] = E::store(scale_in * (c1 * dz + c2 * xhat + c3 + E::load(grad_avg[i])));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc xhat = E::load(a[i]) * rstd + q;
      const acc dz = grad_z<T>(E::load(dy[i]), xhat * w + b);
      grad_in[i] = E::store(scale_in * (c1 * dz + c2 * xhat + c3));
    }
  }
}

// grad_input = scale_in * (c1 * dz + c2 * xhat + c3 + grad_average), dz read from a float
// buffer (half-precision types, whose grad_input cannot hold it).
template <typename T>
void grad_apply_dz_span(const typename Elem<T>::storage* __restrict a,
                        const typename Elem<T>::storage* __restrict grad_avg,
                        const typename Elem<T>::acc* __restrict dz,
                        typename Elem<T>::storage* __restrict grad_in, int64_t n,
                        typename Elem<T>::acc rstd, typename Elem<T>::acc q, typename Elem<T>::acc c1,
                        typename Elem<T>::acc c2, typename Elem<T>::acc c3, typename Elem<T>::acc scale_in) {
  using E = Elem<T>;
  using acc = typename E::acc;
  if (grad_avg != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc xhat = E::load(a[i]) * rstd + q;
      grad_in[i] = E::store(scale_in * (c1 * dz[i] + c2 * xhat + c3 + E::load(grad_avg[i])));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc xhat = E::load(a[i]) * rstd + q;
      grad_in[i] = E::store(scale_in * (c1 * dz[i] + c2 * xhat + c3));
    }
  }
}

// -- channels-last (NDHWC) loops --------------------------------------------------------------
// Each runs over a span of whole rows (one voxel's C channels each, channel innermost) as a
// flat array. What varies per channel comes as a pattern of `period` elements: a whole number
// of rows, mostly a multiple of 16, so that the inner loop is long and runs in full vectors
// however many channels there are (29 channels: 16 rows, 464 elements). Element o + j of a
// span is channel j % C, so the per-channel sums accumulate per pattern position (float
// accumulators of period elements, zeroed by the caller, who folds them into channels).

// Sums of (a - shift) and its square per position; a = x, or the rounded average written to avg.
template <typename T>
void cl_stats_span(const typename Elem<T>::storage* __restrict x, const typename Elem<T>::storage* __restrict skip,
                   typename Elem<T>::storage* __restrict avg, int64_t n, int64_t period,
                   const typename Elem<T>::acc* __restrict shift, typename Elem<T>::acc* __restrict sum,
                   typename Elem<T>::acc* __restrict sum_sq) {
  using E = Elem<T>;
  using acc = typename E::acc;
  for (int64_t o = 0; o < n; o += period) {
    const int64_t m = std::min(period, n - o);
    const auto* __restrict xo = x + o;
    if (skip != nullptr) {
      const auto* __restrict so = skip + o;
      auto* __restrict ao = avg + o;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const auto rounded = E::store((E::load(xo[j]) + E::load(so[j])) * acc(0.5));
        ao[j] = rounded;
        const acc d = E::load(rounded) - shift[j];
        sum[j] += d;
        sum_sq[j] += d * d;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const acc d = E::load(xo[j]) - shift[j];
        sum[j] += d;
        sum_sq[j] += d * d;
      }
    }
  }
}

// y = silu(a * scale + shift), scale and shift per position.
template <typename T>
void cl_apply_span(const typename Elem<T>::storage* __restrict a, typename Elem<T>::storage* __restrict y,
                   int64_t n, int64_t period, const typename Elem<T>::acc* __restrict scale,
                   const typename Elem<T>::acc* __restrict shift) {
  using E = Elem<T>;
  using acc = typename E::acc;
  for (int64_t o = 0; o < n; o += period) {
    const int64_t m = std::min(period, n - o);
    const auto* __restrict ao = a + o;
    auto* __restrict yo = y + o;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const acc z = E::load(ao[j]) * scale[j] + shift[j];
      yo[j] = E::store(silu(z));
    }
  }
}

// Per position sums of dz, dz * xhat and xhat, xhat = a * rstd + q; with KEEP, dz is also
// written to dz_out (float and double: grad_input's buffer).
template <typename T, bool KEEP>
void cl_grad_stats_span(const typename Elem<T>::storage* __restrict dy, const typename Elem<T>::storage* __restrict a,
                        typename Elem<T>::acc* __restrict dz_out, int64_t n, int64_t period,
                        const typename Elem<T>::acc* __restrict rstd, const typename Elem<T>::acc* __restrict q,
                        const typename Elem<T>::acc* __restrict w, const typename Elem<T>::acc* __restrict b,
                        typename Elem<T>::acc* __restrict sum_dz, typename Elem<T>::acc* __restrict sum_dz_xhat,
                        typename Elem<T>::acc* __restrict sum_xhat) {
  using E = Elem<T>;
  using acc = typename E::acc;
  for (int64_t o = 0; o < n; o += period) {
    const int64_t m = std::min(period, n - o);
    const auto* __restrict dyo = dy + o;
    const auto* __restrict ao = a + o;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const acc xhat = E::load(ao[j]) * rstd[j] + q[j];
      const acc dz = grad_z<T>(E::load(dyo[j]), xhat * w[j] + b[j]);
      if constexpr (KEEP) dz_out[o + j] = dz;
      sum_dz[j] += dz;
      sum_dz_xhat[j] += dz * xhat;
      sum_xhat[j] += xhat;
    }
  }
}

// grad = scale_in * (c1 * dz + c2 * xhat + c3 + grad_average): in place over the kept dz when
// KEPT (float, double), else with dz computed again from dy (half-precision types).
template <typename T, bool KEPT>
void cl_grad_apply_span(const typename Elem<T>::storage* __restrict dy, const typename Elem<T>::storage* __restrict a,
                        const typename Elem<T>::storage* __restrict grad_avg,
                        typename Elem<T>::storage* __restrict grad_in, int64_t n, int64_t period,
                        const typename Elem<T>::acc* __restrict rstd, const typename Elem<T>::acc* __restrict q,
                        const typename Elem<T>::acc* __restrict w, const typename Elem<T>::acc* __restrict b,
                        const typename Elem<T>::acc* __restrict c1, const typename Elem<T>::acc* __restrict c2,
                        const typename Elem<T>::acc* __restrict c3, typename Elem<T>::acc scale_in) {
  using E = Elem<T>;
  using acc = typename E::acc;
  for (int64_t o = 0; o < n; o += period) {
    const int64_t m = std::min(period, n - o);
    const auto* __restrict ao = a + o;
    auto* __restrict go = grad_in + o;
    const auto* __restrict dyo = dy + o;
    const auto* __restrict gao = grad_avg != nullptr ? grad_avg + o : nullptr;
    if (gao != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const acc xhat = E::load(ao[j]) * rstd[j] + q[j];
        acc dz;
        if constexpr (KEPT) {
          dz = go[j];
        } else {
          dz = grad_z<T>(E::load(dyo[j]), xhat * w[j] + b[j]);
        }
        go[j] = E::store(scale_in * (c1[j] * dz + c2[j] * xhat + c3[j] + E::load(gao[j])));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const acc xhat = E::load(ao[j]) * rstd[j] + q[j];
        acc dz;
        if constexpr (KEPT) {
          dz = go[j];
        } else {
          dz = grad_z<T>(E::load(dyo[j]), xhat * w[j] + b[j]);
        }
        go[j] = E::store(scale_in * (c1[j] * dz + c2[j] * xhat + c3[j]));
      }
    }
  }
}
