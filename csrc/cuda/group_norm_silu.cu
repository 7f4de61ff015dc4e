// GroupNorm + SiLU on the GPU, with the averaging skip and the per-(batch, channel) bias.
//
// x is (B, C, S) contiguous: channel (b, c) is one run of S elements, a group Cg = C / G
// consecutive channels. At the paper's sizes a group holds millions of elements, so the
// elementwise kernels run on a (B * C, chunks) grid, one block per chunk of kChunk elements of
// one channel (per-block constants, coalesced 16-byte accesses when S allows), and a small
// kernel per (b, g) combines the chunk sums in double in between:
//   forward:  stats (sums of a - shift and its square; writes the average) -> group_stats
//             (mean, rstd, and y = silu(a * scale + shift) constants) -> apply
//   backward: grad_stats (sums of dz, dz * xhat, xhat) -> group_grad (coefficients, grad_add)
//             -> grad_apply
// shift is the channel's first value, so a large mean does not cancel the variance away.
#include "group_norm_silu.h"

#include <algorithm>

#include "launch.cuh"

namespace patchddm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 4096;  // elements per block: 16 per thread
constexpr int64_t kMaxGridY = 65535;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V consecutive elements at p, converted to the arithmetic type (p aligned when V > 1).
template <typename T, int V>
__device__ __forceinline__ void load_acc(const T* p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(pack.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_raw(T* p, const T (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int k = 0; k < V; ++k) pack.v[k] = in[k];
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

template <typename T, int V>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T> (&in)[V]) {
  T raw[V];
#pragma unroll
  for (int k = 0; k < V; ++k) raw[k] = from_acc<T>(in[k]);
  store_raw<T, V>(p, raw);
}

// Sums each of the N values over the block; the totals are valid in thread 0.
template <typename A, int N>
__device__ __forceinline__ void block_sum(A (&v)[N]) {
  __shared__ A partial[kWarps][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    for (int offset = 16; offset > 0; offset /= 2) v[n] += __shfl_down_sync(0xffffffffu, v[n], offset);
    if (lane == 0) partial[warp][n] = v[n];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      v[n] = lane < kWarps ? partial[lane][n] : A(0);
      for (int offset = 16; offset > 0; offset /= 2) v[n] += __shfl_down_sync(0xffffffffu, v[n], offset);
    }
  }
  __syncthreads();  // partial may be reused by the next call
}

__device__ __forceinline__ float exp_neg(float z) { return expf(-z); }
__device__ __forceinline__ double exp_neg(double z) { return exp(-z); }

template <typename A>
__device__ __forceinline__ A silu(A z) {
  return z / (A(1) + exp_neg(z));  // exp overflows to inf for z < -88: the result is -0
}

// dy * silu'(z).
template <typename A>
__device__ __forceinline__ A grad_z(A dy, A z) {
  const A sig = A(1) / (A(1) + exp_neg(z));
  return dy * sig * (A(1) + z * (A(1) - sig));
}

// The channel's first normalised input: x, or the average rounded to T.
template <typename T>
__device__ __forceinline__ acc_t<T> first_value(const T* x, const T* skip, int64_t base) {
  using A = acc_t<T>;
  const A a = to_acc(x[base]);
  return skip != nullptr ? to_acc(from_acc<T>((a + to_acc(skip[base])) * A(0.5))) : a;
}

struct Span {
  int64_t bc, base, start, end;
};

__device__ __forceinline__ Span block_span(int64_t S, int64_t chunk) {
  const int64_t bc = blockIdx.x, start = static_cast<int64_t>(blockIdx.y) * chunk;
  return {bc, bc * S, start, std::min(start + chunk, S)};
}

// -- forward ------------------------------------------------------------------------------------

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ skip, T* __restrict__ average,
                 acc_t<T>* __restrict__ partials, int64_t S, int64_t chunk) {
  using A = acc_t<T>;
  const Span s = block_span(S, chunk);
  const A shift = first_value(x, skip, s.base);
  A sums[2] = {A(0), A(0)};
  for (int64_t i = s.start + threadIdx.x * V; i < s.end; i += kThreads * V) {
    A a[V];
    load_acc<T, V>(x + s.base + i, a);
    if (skip != nullptr) {
      A b[V];
      T rounded[V];
      load_acc<T, V>(skip + s.base + i, b);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        rounded[k] = from_acc<T>((a[k] + b[k]) * A(0.5));
        a[k] = to_acc(rounded[k]);
      }
      store_raw<T, V>(average + s.base + i, rounded);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d = a[k] - shift;
      sums[0] += d;
      sums[1] += d * d;
    }
  }
  block_sum<A, 2>(sums);
  if (threadIdx.x == 0) {
    const int64_t slot = (s.bc * gridDim.y + blockIdx.y) * 2;
    partials[slot] = sums[0];
    partials[slot + 1] = sums[1];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_stats_kernel(const T* __restrict__ x, const T* __restrict__ skip, const acc_t<T>* __restrict__ partials,
                       const acc_t<T>* __restrict__ add, const acc_t<T>* __restrict__ weight,
                       const acc_t<T>* __restrict__ bias, acc_t<T>* __restrict__ mean_out,
                       acc_t<T>* __restrict__ rstd_out, acc_t<T>* __restrict__ coef, int64_t S, int64_t C,
                       int64_t Cg, int64_t n_chunks, double eps) {
  using A = acc_t<T>;
  const int64_t bg = blockIdx.x;
  // Channels merge one at a time (Chan et al.), in thread 0; adding `add`, constant over a
  // channel, moves only the channel's mean.
  double count = 0, mean = 0, m2 = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t bc = bg * Cg + j;
    double sums[2] = {0, 0};
    for (int64_t k = threadIdx.x; k < n_chunks; k += kThreads) {
      sums[0] += partials[(bc * n_chunks + k) * 2];
      sums[1] += partials[(bc * n_chunks + k) * 2 + 1];
    }
    block_sum<double, 2>(sums);
    if (threadIdx.x == 0) {
      const double m = sums[0] / S;
      const double mean_c = static_cast<double>(first_value(x, skip, bc * S)) + m +
                            (add != nullptr ? static_cast<double>(add[bc]) : 0.0);
      const double m2_c = fmax(0.0, sums[1] - sums[0] * m);
      const double total = count + S, delta = mean_c - mean;
      mean += delta * S / total;
      m2 += m2_c + delta * delta * count * S / total;
      count = total;
    }
  }
  __shared__ A stats[2];
  if (threadIdx.x == 0) {
    stats[0] = static_cast<A>(mean);
    stats[1] = static_cast<A>(1.0 / sqrt(m2 / count + eps));
    mean_out[bg] = stats[0];
    rstd_out[bg] = stats[1];
  }
  __syncthreads();
  // y = silu(a * scale + shift), from the statistics as stored (which the backward reads).
  for (int64_t j = threadIdx.x; j < Cg; j += kThreads) {
    const int64_t bc = bg * Cg + j, c = bc % C;
    const double scale = static_cast<double>(stats[1]) * (weight != nullptr ? static_cast<double>(weight[c]) : 1.0);
    const double a = add != nullptr ? static_cast<double>(add[bc]) : 0.0;
    coef[bc * 2] = static_cast<A>(scale);
    coef[bc * 2 + 1] = static_cast<A>((a - static_cast<double>(stats[0])) * scale +
                                      (bias != nullptr ? static_cast<double>(bias[c]) : 0.0));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ a, const acc_t<T>* __restrict__ coef, T* __restrict__ y, int64_t S,
                 int64_t chunk) {
  using A = acc_t<T>;
  const Span s = block_span(S, chunk);
  const A scale = coef[s.bc * 2], shift = coef[s.bc * 2 + 1];
  for (int64_t i = s.start + threadIdx.x * V; i < s.end; i += kThreads * V) {
    A v[V];
    load_acc<T, V>(a + s.base + i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = silu(v[k] * scale + shift);
    store_acc<T, V>(y + s.base + i, v);
  }
}

// -- backward -----------------------------------------------------------------------------------

// xhat = a * rstd + q, z = xhat * w + b for channel bc.
template <typename A>
struct ChannelConstants {
  A rstd, q, w, b;
};

template <typename A>
__device__ __forceinline__ ChannelConstants<A> channel_constants(const A* add, const A* weight, const A* bias,
                                                                 const A* mean, const A* rstd, int64_t bc,
                                                                 int64_t C, int64_t Cg) {
  const int64_t bg = bc / Cg, c = bc % C;
  const A r = rstd[bg];
  return {r, ((add != nullptr ? add[bc] : A(0)) - mean[bg]) * r, weight != nullptr ? weight[c] : A(1),
          bias != nullptr ? bias[c] : A(0)};
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_stats_kernel(const T* __restrict__ dy, const T* __restrict__ a, const acc_t<T>* __restrict__ add,
                      const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ bias,
                      const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                      acc_t<T>* __restrict__ partials, int64_t S, int64_t C, int64_t Cg, int64_t chunk) {
  using A = acc_t<T>;
  const Span s = block_span(S, chunk);
  const ChannelConstants<A> k = channel_constants(add, weight, bias, mean, rstd, s.bc, C, Cg);
  A sums[3] = {A(0), A(0), A(0)};
  for (int64_t i = s.start + threadIdx.x * V; i < s.end; i += kThreads * V) {
    A av[V], dv[V];
    load_acc<T, V>(a + s.base + i, av);
    load_acc<T, V>(dy + s.base + i, dv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A xhat = av[e] * k.rstd + k.q;
      const A dz = grad_z(dv[e], xhat * k.w + k.b);
      sums[0] += dz;
      sums[1] += dz * xhat;
      sums[2] += xhat;
    }
  }
  block_sum<A, 3>(sums);
  if (threadIdx.x == 0) {
    const int64_t slot = (s.bc * gridDim.y + blockIdx.y) * 3;
    for (int n = 0; n < 3; ++n) partials[slot + n] = sums[n];
  }
}

// du = rstd (w dz - m1 - xhat m2), m1 and m2 the group means of w dz and w dz xhat:
// grad_input = scale_in (c1 dz + c2 xhat + c3 + grad_average) with c1 = rstd w, c2 = -rstd m2,
// c3 = -rstd m1; grad_add = sum over the channel of du.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_grad_kernel(const acc_t<T>* __restrict__ partials, const acc_t<T>* __restrict__ weight,
                      const acc_t<T>* __restrict__ rstd, acc_t<T>* __restrict__ channel, acc_t<T>* __restrict__ coef,
                      acc_t<T>* __restrict__ grad_add, int64_t S, int64_t C, int64_t Cg, int64_t n_chunks) {
  using A = acc_t<T>;
  const int64_t bg = blockIdx.x;
  double m1 = 0, m2 = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t bc = bg * Cg + j;
    double sums[3] = {0, 0, 0};
    for (int64_t k = threadIdx.x; k < n_chunks; k += kThreads) {
      for (int n = 0; n < 3; ++n) sums[n] += partials[(bc * n_chunks + k) * 3 + n];
    }
    block_sum<double, 3>(sums);
    if (threadIdx.x == 0) {
      for (int n = 0; n < 3; ++n) channel[bc * 3 + n] = static_cast<A>(sums[n]);
      const double w = weight != nullptr ? static_cast<double>(weight[bc % C]) : 1.0;
      m1 += w * sums[0];
      m2 += w * sums[1];
    }
  }
  if (threadIdx.x != 0) return;
  const double n = static_cast<double>(Cg) * S;
  m1 /= n;
  m2 /= n;
  const double r = static_cast<double>(rstd[bg]);
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t bc = bg * Cg + j;
    const double c1 = r * (weight != nullptr ? static_cast<double>(weight[bc % C]) : 1.0);
    const double c2 = -r * m2, c3 = -r * m1;
    coef[bc * 3] = static_cast<A>(c1);
    coef[bc * 3 + 1] = static_cast<A>(c2);
    coef[bc * 3 + 2] = static_cast<A>(c3);
    if (grad_add != nullptr) {
      grad_add[bc] = static_cast<A>(c1 * static_cast<double>(channel[bc * 3]) +
                                    c2 * static_cast<double>(channel[bc * 3 + 2]) + c3 * S);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_apply_kernel(const T* __restrict__ dy, const T* __restrict__ a, const T* __restrict__ grad_average,
                      const acc_t<T>* __restrict__ add, const acc_t<T>* __restrict__ weight,
                      const acc_t<T>* __restrict__ bias, const acc_t<T>* __restrict__ mean,
                      const acc_t<T>* __restrict__ rstd, const acc_t<T>* __restrict__ coef, T* __restrict__ grad_in,
                      int64_t S, int64_t C, int64_t Cg, int64_t chunk, acc_t<T> input_scale) {
  using A = acc_t<T>;
  const Span s = block_span(S, chunk);
  const ChannelConstants<A> k = channel_constants(add, weight, bias, mean, rstd, s.bc, C, Cg);
  const A c1 = coef[s.bc * 3], c2 = coef[s.bc * 3 + 1], c3 = coef[s.bc * 3 + 2];
  for (int64_t i = s.start + threadIdx.x * V; i < s.end; i += kThreads * V) {
    A av[V], dv[V], g[V];
    load_acc<T, V>(a + s.base + i, av);
    load_acc<T, V>(dy + s.base + i, dv);
    if (grad_average != nullptr) {
      load_acc<T, V>(grad_average + s.base + i, g);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) g[e] = A(0);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A xhat = av[e] * k.rstd + k.q;
      const A dz = grad_z(dv[e], xhat * k.w + k.b);
      g[e] = input_scale * (c1 * dz + c2 * xhat + c3 + g[e]);
    }
    store_acc<T, V>(grad_in + s.base + i, g);
  }
}

// -- launch -------------------------------------------------------------------------------------

// 16-byte accesses when every channel starts on a 16-byte boundary of every big tensor.
template <typename T>
bool can_vectorise(int64_t S, std::initializer_list<const void*> pointers) {
  if (S % (16 / sizeof(T)) != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

template <typename T>
constexpr int kVec = 16 / sizeof(T);

}  // namespace

int64_t group_norm_chunk(int64_t spatial) {
  const int64_t blocks = ceil_div(spatial, kMaxGridY);  // the chunk must keep the grid's y within range
  return std::max<int64_t>(kChunk, ceil_div(blocks, kChunk) * kChunk);
}

void group_norm_silu_forward(const GroupNormForwardParams& p, DType dtype, cudaStream_t stream) {
  const int64_t S = p.spatial, bc_count = p.batch * p.channels;
  if (S == 0 || bc_count == 0) return;
  if (bc_count > INT32_MAX) throw std::runtime_error("patchddm: group_norm_silu: too many (batch, channel) pairs");
  const int64_t chunk = group_norm_chunk(S), n_chunks = ceil_div(S, chunk);
  const dim3 grid(static_cast<unsigned>(bc_count), static_cast<unsigned>(n_chunks));
  dispatch_dtype(dtype, [&]<typename T>() {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    const T* skip = static_cast<const T*>(p.skip);
    T* average = static_cast<T*>(p.average);
    T* y = static_cast<T*>(p.y);
    A* partials = static_cast<A*>(p.partials);
    A* coef = static_cast<A*>(p.coef);
    const bool vec = can_vectorise<T>(S, {p.x, p.skip, p.average, p.y});
    if (vec) {
      stats_kernel<T, kVec<T>><<<grid, kThreads, 0, stream>>>(x, skip, average, partials, S, chunk);
    } else {
      stats_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, skip, average, partials, S, chunk);
    }
    check_launch("group_norm_silu stats");
    group_stats_kernel<T><<<static_cast<unsigned>(p.batch * p.groups), kThreads, 0, stream>>>(
        x, skip, partials, static_cast<const A*>(p.add), static_cast<const A*>(p.weight),
        static_cast<const A*>(p.bias), static_cast<A*>(p.mean), static_cast<A*>(p.rstd), coef, S, p.channels,
        p.channels / p.groups, n_chunks, p.eps);
    check_launch("group_norm_silu group statistics");
    const T* a = skip != nullptr ? average : x;
    if (vec) {
      apply_kernel<T, kVec<T>><<<grid, kThreads, 0, stream>>>(a, coef, y, S, chunk);
    } else {
      apply_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, coef, y, S, chunk);
    }
    check_launch("group_norm_silu apply");
  });
}

void group_norm_silu_backward(const GroupNormBackwardParams& p, DType dtype, cudaStream_t stream) {
  const int64_t S = p.spatial, bc_count = p.batch * p.channels, Cg = p.channels / p.groups;
  if (S == 0 || bc_count == 0) return;
  if (bc_count > INT32_MAX) throw std::runtime_error("patchddm: group_norm_silu: too many (batch, channel) pairs");
  const int64_t chunk = group_norm_chunk(S), n_chunks = ceil_div(S, chunk);
  const dim3 grid(static_cast<unsigned>(bc_count), static_cast<unsigned>(n_chunks));
  dispatch_dtype(dtype, [&]<typename T>() {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(p.grad_out);
    const T* a = static_cast<const T*>(p.input);
    const T* grad_average = static_cast<const T*>(p.grad_average);
    T* grad_in = static_cast<T*>(p.grad_input);
    const A* add = static_cast<const A*>(p.add);
    const A* weight = static_cast<const A*>(p.weight);
    const A* bias = static_cast<const A*>(p.bias);
    const A* mean = static_cast<const A*>(p.mean);
    const A* rstd = static_cast<const A*>(p.rstd);
    A* partials = static_cast<A*>(p.partials);
    A* coef = static_cast<A*>(p.coef);
    const bool vec = can_vectorise<T>(S, {p.grad_out, p.input, p.grad_average, p.grad_input});
    if (vec) {
      grad_stats_kernel<T, kVec<T>><<<grid, kThreads, 0, stream>>>(dy, a, add, weight, bias, mean, rstd, partials,
                                                                    S, p.channels, Cg, chunk);
    } else {
      grad_stats_kernel<T, 1><<<grid, kThreads, 0, stream>>>(dy, a, add, weight, bias, mean, rstd, partials, S,
                                                              p.channels, Cg, chunk);
    }
    check_launch("group_norm_silu backward statistics");
    group_grad_kernel<T><<<static_cast<unsigned>(p.batch * p.groups), kThreads, 0, stream>>>(
        partials, weight, rstd, static_cast<A*>(p.channel), coef, static_cast<A*>(p.grad_add), S, p.channels, Cg,
        n_chunks);
    check_launch("group_norm_silu backward group sums");
    const A scale = static_cast<A>(p.input_scale);
    if (vec) {
      grad_apply_kernel<T, kVec<T>><<<grid, kThreads, 0, stream>>>(dy, a, grad_average, add, weight, bias, mean,
                                                                    rstd, coef, grad_in, S, p.channels, Cg, chunk,
                                                                    scale);
    } else {
      grad_apply_kernel<T, 1><<<grid, kThreads, 0, stream>>>(dy, a, grad_average, add, weight, bias, mean, rstd,
                                                              coef, grad_in, S, p.channels, Cg, chunk, scale);
    }
    check_launch("group_norm_silu backward apply");
  });
}

}  // namespace patchddm::cuda
