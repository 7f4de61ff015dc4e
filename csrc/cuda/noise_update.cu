// The fused noise update and Philox noise on the GPU.
//
// Each thread owns one Philox group: the 4 consecutive noise indices g = 4k .. 4k + 3 of one
// batch element (grid axis y), so one Philox evaluation and two Box-Muller pairs serve four
// elements. When the groups line up with memory (offset and row length multiples of 4,
// aligned rows), the four elements of x, eps, out and x0 move as one vector (16 bytes for
// float32); otherwise as four bounds-checked scalars. 64-bit indexing throughout.
#include "noise_update.h"

#include <algorithm>

#include "../philox.h"
#include "launch.cuh"

namespace patchddm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct alignas(sizeof(T) * 4) Quad {
  T v[4];
};

template <typename A>
struct Coef {
  A a, b, c, d, e, s;
};

// The coefficients of a row: from the kernel's parameters, or from device memory.
template <typename A>
__device__ __forceinline__ Coef<A> load_coef(const NoiseUpdateParams& p, int64_t row) {
  A k[6];
  if (p.coef == nullptr) {
    const double* v = p.inline_coef[p.coef_stride == 0 ? 0 : row];
#pragma unroll
    for (int i = 0; i < 6; ++i) k[i] = static_cast<A>(v[i]);
  } else {
    const int64_t base = row * p.coef_stride;
#pragma unroll
    for (int i = 0; i < 6; ++i) {
      k[i] = p.coef_double ? static_cast<A>(static_cast<const double*>(p.coef)[base + i])
                           : static_cast<A>(static_cast<const float*>(p.coef)[base + i]);
    }
  }
  return {k[0], k[1], k[2], k[3], k[4], k[5]};
}

template <typename T, bool kEps, bool kNoise, bool kX0, bool kVec>
__global__ void __launch_bounds__(kThreads)
    noise_update_kernel(const NoiseUpdateParams p, int64_t row0) {
  using A = acc_t<T>;
  const int64_t row = row0 + blockIdx.y;
  const uint64_t row_start = p.offset + static_cast<uint64_t>(row) * static_cast<uint64_t>(p.inner);
  const uint64_t group = (row_start >> 2) + blockIdx.x * static_cast<uint64_t>(kThreads) + threadIdx.x;
  // The row's position of the group's first element: up to 3 before the row in the first group.
  const int64_t j = static_cast<int64_t>(group * 4 - row_start);
  if (j >= p.inner) return;
  const Coef<A> k = load_coef<A>(p, row);
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (kNoise) {
    const philox::Normals n = philox::normal4(p.seed, group);
    z[0] = n.z0;
    z[1] = n.z1;
    z[2] = n.z2;
    z[3] = n.z3;
  }
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride + j;
  const T* eps = kEps ? static_cast<const T*>(p.eps) + row * p.eps_stride + j : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.out_stride + j;
  T* x0_out = kX0 ? static_cast<T*>(p.x0) + row * p.x0_stride + j : nullptr;

  Quad<T> xv, ev, ov, x0v;
  if constexpr (kVec) {
    xv = *reinterpret_cast<const Quad<T>*>(x);
    if constexpr (kEps) ev = *reinterpret_cast<const Quad<T>*>(eps);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const bool inside = j + l >= 0 && j + l < p.inner;
      xv.v[l] = inside ? x[l] : T{};
      if constexpr (kEps) ev.v[l] = inside ? eps[l] : T{};
    }
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const A xl = to_acc(xv.v[l]);
    const A el = kEps ? to_acc(ev.v[l]) : A(0);
    A x0 = k.a * xl;
    if constexpr (kEps) x0 += k.b * el;
    if (p.clip) x0 = x0 < A(-1) ? A(-1) : (x0 > A(1) ? A(1) : x0);  // keeps NaN, as torch.clamp
    // ((c x0 + d x) + e eps) + s z: the reference's order of operations
    A o = k.c * x0 + k.d * xl;
    if constexpr (kEps) o += k.e * el;
    if constexpr (kNoise) o += k.s * static_cast<A>(z[l]);
    ov.v[l] = from_acc<T>(o);
    if constexpr (kX0) x0v.v[l] = from_acc<T>(x0);
  }
  if constexpr (kVec) {
    *reinterpret_cast<Quad<T>*>(out) = ov;
    if constexpr (kX0) *reinterpret_cast<Quad<T>*>(x0_out) = x0v;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (j + l >= 0 && j + l < p.inner) {
        out[l] = ov.v[l];
        if constexpr (kX0) x0_out[l] = x0v.v[l];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const uint64_t group = (offset >> 2) + blockIdx.x * static_cast<uint64_t>(kThreads) + threadIdx.x;
  const int64_t j = static_cast<int64_t>(group * 4 - offset);
  if (j >= n) return;
  const philox::Normals z = philox::normal4(seed, group);
  const float v[4] = {z.z0, z.z1, z.z2, z.z3};
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if (j + l >= 0 && j + l < n) out[j + l] = from_acc<T>(static_cast<acc_t<T>>(v[l]));
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, bool kEps, bool kNoise, bool kX0>
void launch(const NoiseUpdateParams& p, cudaStream_t stream) {
  // Vectors when every group lies inside one row and on a Quad boundary of every tensor.
  const size_t quad = sizeof(Quad<T>);
  bool vec = p.offset % 4 == 0 && p.inner % 4 == 0 && aligned(p.x, quad) && aligned(p.out, quad) &&
             p.x_stride % 4 == 0 && p.out_stride % 4 == 0;
  if (kEps) vec = vec && aligned(p.eps, quad) && p.eps_stride % 4 == 0;
  if (kX0) vec = vec && aligned(p.x0, quad) && p.x0_stride % 4 == 0;
  // Groups per row, counting the partial ones at both ends.
  const int64_t groups = ceil_div(p.inner + 3, 4);
  const int64_t blocks = ceil_div(groups, kThreads);
  for (int64_t row0 = 0; row0 < p.batch; row0 += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min(kMaxGridY, p.batch - row0)));
    if (vec) {
      noise_update_kernel<T, kEps, kNoise, kX0, true><<<grid, kThreads, 0, stream>>>(p, row0);
    } else {
      noise_update_kernel<T, kEps, kNoise, kX0, false><<<grid, kThreads, 0, stream>>>(p, row0);
    }
    check_launch("noise_update");
  }
}

}  // namespace

void noise_update(const NoiseUpdateParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.inner == 0) return;
  dispatch_dtype(dtype, [&]<typename T>() {
    const int variant = (p.eps ? 4 : 0) | (p.add_noise ? 2 : 0) | (p.x0 ? 1 : 0);
    switch (variant) {
      case 0: launch<T, false, false, false>(p, stream); break;
      case 1: launch<T, false, false, true>(p, stream); break;
      case 2: launch<T, false, true, false>(p, stream); break;
      case 3: launch<T, false, true, true>(p, stream); break;
      case 4: launch<T, true, false, false>(p, stream); break;
      case 5: launch<T, true, false, true>(p, stream); break;
      case 6: launch<T, true, true, false>(p, stream); break;
      default: launch<T, true, true, true>(p, stream); break;
    }
  });
}

void philox_normal(void* out, int64_t n, uint64_t seed, uint64_t offset, DType dtype,
                   cudaStream_t stream) {
  if (n == 0) return;
  dispatch_dtype(dtype, [&]<typename T>() {
    const int64_t blocks = ceil_div(ceil_div(n + 3, 4), kThreads);
    philox_normal_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<T*>(out), n,
                                                                                  seed, offset);
    check_launch("philox_normal");
  });
}

}  // namespace patchddm::cuda
