// Input checks shared by the host wrappers of every op (CPU and CUDA). Each names the op and
// the argument, so a user who passes a wrong tensor sees which one and why.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace patchddm {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous() first); got strides ", t.strides());
}

}  // namespace patchddm
