// Launcher of the CUDA (h + skip) / 2 kernel; torch-free so that nvcc stays fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace patchddm::cuda {

void avg_skip(const void* h, const void* skip, void* out, int64_t n, DType dtype,
              cudaStream_t stream);

}  // namespace patchddm::cuda
