// Argument checks of group_norm_silu_forward / _backward, shared by the CPU and CUDA hosts:
// every error names the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace patchddm {

// x seen as (batch, channels, spatial): a group is channels / groups consecutive channels.
struct GroupNormDims {
  int64_t batch, channels, spatial, groups;
  int64_t per_group() const { return channels / groups; }
};

inline at::ScalarType group_norm_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline GroupNormDims check_group_norm_input(const char* op, const char* name, const at::Tensor& x,
                                            int64_t groups) {
  check_float(op, name, x);
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must have at least 2 dimensions (batch, channels, ...), got shape ",
              x.sizes());
  check_contiguous(op, name, x);
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, op, ": groups=", groups,
              " must be a positive divisor of the ", channels, " channels of ", name, " (shape ", x.sizes(), ")");
  const int64_t spatial = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  return {batch, channels, spatial, groups};
}

// add (B, C), weight (C,), bias (C,): any float dtype, on x's device.
inline void check_group_norm_param(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                   const at::Tensor& x, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_float(op, name, *t);
  check_same_device(op, name, *t, x);
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " has shape ", t->sizes(), ", expected ", shape);
}

inline void check_group_norm_params(const char* op, const GroupNormDims& d, const at::Tensor& x,
                                    const std::optional<at::Tensor>& add,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias) {
  check_group_norm_param(op, "add", add, x, {d.batch, d.channels});
  check_group_norm_param(op, "weight", weight, x, {d.channels});
  check_group_norm_param(op, "bias", bias, x, {d.channels});
}

// A tensor of x's shape, dtype and device (skip, grad_out, grad_average), contiguous.
inline void check_group_norm_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_same_device(op, name, t, x);
  check_same_dtype(op, name, t, x);
  check_same_shape(op, name, t, x);
  check_contiguous(op, name, t);
}

// mean or rstd: (B, G) in the arithmetic dtype of x.
inline void check_group_norm_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                                   const GroupNormDims& d) {
  check_same_device(op, name, t, x);
  const auto acc = group_norm_acc_type(x);
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", acc);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d.batch && t.size(1) == d.groups, op, ": ", name, " has shape ",
              t.sizes(), ", expected (", d.batch, ", ", d.groups, ")");
  check_contiguous(op, name, t);
}

}  // namespace patchddm
