// The coordinate encoding of PatchDDM, shared by the CPU and CUDA kernels (torch-free).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PATCHDDM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PATCHDDM_HOST_DEVICE inline
#endif

namespace patchddm {

// Largest coordinate-grid size for which 2j - (n - 1) and n - 1 are exact in float32.
constexpr int64_t kMaxCoordSize = int64_t(1) << 23;

// linspace(-1, 1, n)[j], correctly rounded to A: (2j - (n - 1)) / (n - 1) is one IEEE
// division of two exactly representable integers, so every backend gets the same bits and
// differs from torch.linspace (which accumulates steps) by at most half an ulp of 1. An axis
// of size 1 gives -1, as linspace(-1, 1, 1) does.
template <typename A>
PATCHDDM_HOST_DEVICE A coord_value(int64_t j, int64_t n) {
  if (n <= 1) return A(-1);
  const A num = static_cast<A>(2 * j - (n - 1)), den = static_cast<A>(n - 1);
#if defined(__CUDA_ARCH__)
  // Round-to-nearest division even under --use_fast_math.
  if constexpr (sizeof(A) == 4) return __fdiv_rn(num, den);
  else return __ddiv_rn(num, den);
#else
  return num / den;
#endif
}

}  // namespace patchddm
