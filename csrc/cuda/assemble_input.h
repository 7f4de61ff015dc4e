// Launcher of the CUDA model-input assembly; torch-free so that nvcc stays fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace patchddm::cuda {

// Patches whose offsets travel inside the kernel's parameters; more go through a device buffer.
constexpr int kInlinePatches = 32;

struct AssembleParams {
  const void* volume;
  int64_t volume_stride[5];
  bool shared_volume;      // volume batch 1 serves every patch
  const void* x_t;         // null without x_t
  int64_t x_t_stride[5];
  DType x_t_dtype;
  void* out;
  int64_t out_stride[5];
  int64_t batch, channels, extra;  // B, image channels C, x_t channels (0 without x_t)
  int64_t patch[3], coord[3];
  const int64_t* offsets_device;  // (B, 3) on the device, or null: then inline_offsets
  int64_t inline_offsets[kInlinePatches][3];
};

// Writes out[b] = [volume crop at offsets[b], 3 coordinate channels, x_t[b]] for every b.
void assemble_input(const AssembleParams& params, DType dtype, cudaStream_t stream);

}  // namespace patchddm::cuda
