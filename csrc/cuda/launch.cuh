// Device-side helpers shared by the kernel files: float conversion of every supported dtype,
// launch-error checking, alignment, and a dtype switch that mirrors AT_DISPATCH without torch
// headers. (cpu/vec.h is the CPU kernels' counterpart.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace patchddm::cuda {

// The arithmetic type of a kernel: float for every storage type except double.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

template <typename T> __device__ __forceinline__ acc_t<T> to_acc(T v) { return static_cast<acc_t<T>>(v); }
template <> __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("patchddm: CUDA launch of ") + what +
                             " failed: " + cudaGetErrorString(err));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p may be read and written as 16-byte vectors.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f.template operator()<T>() with T the storage type of dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f.template operator()<float>(); break;
    case DType::Float16: f.template operator()<__half>(); break;
    case DType::BFloat16: f.template operator()<__nv_bfloat16>(); break;
    case DType::Float64: f.template operator()<double>(); break;
  }
}

}  // namespace patchddm::cuda
