// The dtypes a CUDA kernel file can be asked for. Kernel files (.cu) include no torch header,
// which keeps nvcc fast; the host wrappers (.cpp) translate at::ScalarType into this.
#pragma once

namespace patchddm::cuda {

enum class DType { Float32, Float16, BFloat16, Float64 };

}  // namespace patchddm::cuda
