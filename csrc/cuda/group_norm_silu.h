// Launchers of the CUDA GroupNorm + SiLU kernels; torch-free so that nvcc stays fast. The host
// (group_norm_silu_host.cpp) checks the arguments and allocates outputs and workspaces.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace patchddm::cuda {

// Elements of one channel per block of the elementwise kernels; the workspaces hold one entry
// per (channel, chunk).
int64_t group_norm_chunk(int64_t spatial);
inline int64_t group_norm_chunks(int64_t spatial) {
  const int64_t chunk = group_norm_chunk(spatial);
  return (spatial + chunk - 1) / chunk;
}

// x, skip, average, y: (B, C, S) contiguous of the data dtype. add (B, C), weight and bias (C)
// and every other buffer are of the arithmetic dtype (float, or double for double data).
// Null pointers stand for absent optional tensors.
struct GroupNormForwardParams {
  const void* x;
  const void* skip;
  void* average;
  void* y;
  const void* add;
  const void* weight;
  const void* bias;
  void* mean;      // (B, G)
  void* rstd;      // (B, G)
  void* partials;  // workspace: B * C * chunks * 2
  void* coef;      // workspace: B * C * 2
  int64_t batch, channels, spatial, groups;
  double eps;
};

struct GroupNormBackwardParams {
  const void* grad_out;
  const void* grad_average;
  const void* input;
  const void* add;
  const void* weight;
  const void* bias;
  const void* mean;
  const void* rstd;
  void* grad_input;
  void* grad_add;  // (B, C), or null
  void* partials;  // workspace: B * C * chunks * 3
  void* channel;   // (B, C, 3): per channel sums of dz, dz * xhat, xhat (grad_bias, grad_weight)
  void* coef;      // workspace: B * C * 3
  int64_t batch, channels, spatial, groups;
  double input_scale;
};

void group_norm_silu_forward(const GroupNormForwardParams& params, DType dtype, cudaStream_t stream);
void group_norm_silu_backward(const GroupNormBackwardParams& params, DType dtype, cudaStream_t stream);

}  // namespace patchddm::cuda
