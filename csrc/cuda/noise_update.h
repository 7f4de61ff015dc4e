// Launchers of the CUDA noise update and Philox noise; torch-free so that nvcc stays fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace patchddm::cuda {

// Coefficient rows that travel inside the kernel's parameters; more go through device memory.
constexpr int kInlineCoefRows = 32;

// x, eps, out, x0: B rows of `inner` contiguous elements each, row b at data + b * stride
// (elements). eps and x0 may be null. coef: B (or 1, coef_stride 0) rows of 6 values
// a, b, c, d, e, s in device memory, float32 or float64; or null, then inline_coef holds them.
struct NoiseUpdateParams {
  const void* x;
  const void* eps;
  void* out;
  void* x0;
  int64_t x_stride, eps_stride, out_stride, x0_stride;
  int64_t batch, inner;
  const void* coef;
  bool coef_double;
  int64_t coef_stride;
  double inline_coef[kInlineCoefRows][6];
  bool clip, add_noise;
  uint64_t seed, offset;
};

// Per row b with coef[b] = (a, b, c, d, e, s):
//   x0 = a x + b eps (clamped to [-1, 1] when clip);  out = c x0 + d x + e eps + s z.
void noise_update(const NoiseUpdateParams& params, DType dtype, cudaStream_t stream);

// out[i] = z(seed, offset + i) for i < n, out contiguous.
void philox_normal(void* out, int64_t n, uint64_t seed, uint64_t offset, DType dtype,
                   cudaStream_t stream);

}  // namespace patchddm::cuda
