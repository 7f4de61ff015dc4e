// Argument checks of group_norm_silu_forward, _backward, _stats and _apply, shared by the CPU and CUDA hosts:
// every error names the op, the argument and what was expected.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace patchddm {

// x seen as (batch, channels, spatial): a group is channels / groups consecutive channels.
// layout: how x lies in memory, Contiguous (B, C, S) or ChannelsLast(3d) (B, S, C); the other
// tensors of x's shape (skip, grad_out, grad_average, and the outputs) lie the same way.
struct GroupNormDims {
  int64_t batch, channels, spatial, groups;
  at::MemoryFormat layout = at::MemoryFormat::Contiguous;
  int64_t per_group() const { return channels / groups; }
  bool channels_last() const { return layout != at::MemoryFormat::Contiguous; }
};

// ChannelsLast (4-D) or ChannelsLast3d (5-D) for a tensor laid out so and not also contiguous
// (one channel, or one voxel, fits both: then Contiguous, the same memory), else Contiguous.
// As memory_format() in patchddm_fast/ops/group_norm_silu.py.
inline at::MemoryFormat group_norm_layout(const at::Tensor& x) {
  if (x.dim() != 4 && x.dim() != 5) return at::MemoryFormat::Contiguous;
  const auto last = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return !x.is_contiguous() && x.is_contiguous(last) ? last : at::MemoryFormat::Contiguous;
}

inline at::ScalarType group_norm_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dimensions of x laid out as `layout`, and the check of groups.
inline GroupNormDims group_norm_dims(const char* op, const char* name, const at::Tensor& x, int64_t groups,
                                     at::MemoryFormat layout) {
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, op, ": groups=", groups,
              " must be a positive divisor of the ", channels, " channels of ", name, " (shape ", x.sizes(), ")");
  const int64_t spatial = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  return {batch, channels, spatial, groups, layout};
}

// channels_last: whether the kernel also reads channels-last tensors (the CPU kernels do; the
// CUDA ones read contiguous tensors only).
inline GroupNormDims check_group_norm_input(const char* op, const char* name, const at::Tensor& x,
                                            int64_t groups, bool channels_last) {
  check_float(op, name, x);
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must have at least 2 dimensions (batch, channels, ...), got shape ",
              x.sizes());
  const at::MemoryFormat layout = channels_last ? group_norm_layout(x) : at::MemoryFormat::Contiguous;
  if (layout == at::MemoryFormat::Contiguous) {
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous",
                channels_last ? " or channels-last (channels_last for 4-D, channels_last_3d for 5-D)" : "",
                " (call .contiguous() first); got shape ", x.sizes(), " and strides ", x.strides());
  }
  return group_norm_dims(op, name, x, groups, layout);
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

// A tensor of x's shape, dtype, device and memory layout (skip, grad_out, grad_average).
inline void check_group_norm_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                                  const GroupNormDims& d) {
  check_same_device(op, name, t, x);
  check_same_dtype(op, name, t, x);
  check_same_shape(op, name, t, x);
  TORCH_CHECK(t.is_contiguous(d.layout), op, ": ", name, " must be laid out as x, ", d.layout,
              " (call .contiguous(memory_format=...) first); got strides ", t.strides());
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

// Every check of group_norm_silu_forward; returns x's dimensions.
inline GroupNormDims check_group_norm_silu_forward(const char* op, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& skip,
                                                   const std::optional<at::Tensor>& add,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias, int64_t groups,
                                                   double eps, bool channels_last = false) {
  const GroupNormDims d = check_group_norm_input(op, "x", x, groups, channels_last);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be positive and finite, got ", eps);
  if (skip.has_value()) check_group_norm_like(op, "skip", *skip, x, d);
  check_group_norm_params(op, d, x, add, weight, bias);
  return d;
}

// Every check of group_norm_silu_stats: the forward's, without skip, weight and bias.
inline GroupNormDims check_group_norm_silu_stats(const char* op, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& add, int64_t groups, double eps) {
  return check_group_norm_silu_forward(op, x, std::nullopt, add, std::nullopt, std::nullopt, groups, eps,
                                       /*channels_last=*/true);
}

// Every check of group_norm_silu_backward; returns input's dimensions.
inline GroupNormDims check_group_norm_silu_backward(const char* op, const at::Tensor& grad_out,
                                                    const std::optional<at::Tensor>& grad_average,
                                                    const at::Tensor& input, const std::optional<at::Tensor>& add,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                    const at::Tensor& rstd, int64_t groups,
                                                    bool channels_last = false) {
  const GroupNormDims d = check_group_norm_input(op, "input", input, groups, channels_last);
  check_group_norm_like(op, "grad_out", grad_out, input, d);
  if (grad_average.has_value()) check_group_norm_like(op, "grad_average", *grad_average, input, d);
  check_group_norm_params(op, d, input, add, weight, bias);
  check_group_norm_stats(op, "mean", mean, input, d);
  check_group_norm_stats(op, "rstd", rstd, input, d);
  return d;
}

// -- group_norm_silu_apply ----------------------------------------------------------------------

// Where group_norm_silu_apply finds channel (b, c) of x (or of out). Contiguous: channel (b, c)
// is one run of S elements at b * batch_stride + c * channel_stride: a contiguous tensor, or
// a depth slab t[:, :, d0:d1] of one. ChannelsLast(3d): batch entry b is one run of S rows of
// C channels at b * batch_stride: a channels-last tensor, or a depth slab of one.
struct ApplyLayout {
  at::MemoryFormat layout;
  int64_t batch_stride, channel_stride;
};

// Whether dimensions first.. of t are packed row-major, the innermost with stride `inner`
// (dimensions of size 1 may have any stride).
inline bool packed_from(const at::Tensor& t, int64_t first, int64_t inner) {
  int64_t expected = inner;
  for (int64_t k = t.dim() - 1; k >= first; --k) {
    if (t.size(k) != 1 && t.stride(k) != expected) return false;
    expected *= t.size(k);
  }
  return true;
}

// t's layout as `layout` (Contiguous, or the channels-last format of t's rank) if it fits it.
inline std::optional<ApplyLayout> apply_layout_as(const at::Tensor& t, at::MemoryFormat layout) {
  if (layout == at::MemoryFormat::Contiguous) {
    if (packed_from(t, 2, 1)) return ApplyLayout{layout, t.stride(0), t.stride(1)};
  } else if ((t.size(1) == 1 || t.stride(1) == 1) && packed_from(t, 2, t.size(1))) {
    return ApplyLayout{layout, t.stride(0), 1};
  }
  return std::nullopt;
}

// x's layout: Contiguous where it fits (as group_norm_layout, which a dense x also gets here),
// else channels-last for a 4-D or 5-D x; apply_layout() in patchddm_fast/ops/group_norm_silu.py.
inline std::optional<ApplyLayout> apply_layout(const at::Tensor& t) {
  if (auto l = apply_layout_as(t, at::MemoryFormat::Contiguous)) return l;
  if (t.dim() == 4) return apply_layout_as(t, at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return apply_layout_as(t, at::MemoryFormat::ChannelsLast3d);
  return std::nullopt;
}

// Every check of group_norm_silu_apply(_out); returns x's dimensions (layout: x's) and the
// layouts of x and of out (out's: a new tensor's, x's dense twin, without `out`).
inline std::tuple<GroupNormDims, ApplyLayout, std::optional<ApplyLayout>> check_group_norm_silu_apply(
    const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t groups, const std::optional<at::Tensor>& out) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dimensions (batch, channels, ...), got shape ", x.sizes());
  const std::optional<ApplyLayout> xl = apply_layout(x);
  TORCH_CHECK(xl.has_value(), op, ": x must be contiguous or channels-last (4-D or 5-D), or a depth slab ",
              "x[:, :, d0:d1] of either (call .contiguous() first); got shape ", x.sizes(), " and strides ",
              x.strides());
  const GroupNormDims d = group_norm_dims(op, "x", x, groups, xl->layout);
  check_group_norm_params(op, d, x, add, weight, bias);
  check_group_norm_stats(op, "mean", mean, x, d);
  check_group_norm_stats(op, "rstd", rstd, x, d);
  if (!out.has_value()) return {d, *xl, std::nullopt};
  check_same_device(op, "out", *out, x);
  check_same_dtype(op, "out", *out, x);
  check_same_shape(op, "out", *out, x);
  const std::optional<ApplyLayout> ol = apply_layout_as(*out, xl->layout);
  TORCH_CHECK(ol.has_value(), op, ": out must be laid out as x, ", xl->layout,
              " (or a depth slab of such a tensor); got strides ", out->strides());
  at::assert_no_internal_overlap(*out);
  at::assert_no_partial_overlap(*out, x);
  return {d, *xl, ol};
}

// The statistics mean and rstd, (B, G) in x's arithmetic dtype on x's device. For an empty x
// they are final: the statistics of nothing, as every backend gives them.
inline std::tuple<at::Tensor, at::Tensor> group_norm_stats_outputs(const at::Tensor& x, const GroupNormDims& d,
                                                                   double eps) {
  const auto acc_options = x.options().dtype(group_norm_acc_type(x));
  at::Tensor mean = at::empty({d.batch, d.groups}, acc_options);
  at::Tensor rstd = at::empty({d.batch, d.groups}, acc_options);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
  }
  return {mean, rstd};
}

// The forward's outputs y, average (empty without skip), mean and rstd, on x's device, y and
// average in x's layout (group_norm_stats_outputs for the statistics).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_outputs(
    const at::Tensor& x, bool has_skip, const GroupNormDims& d, double eps) {
  at::Tensor y = at::empty_like(x, d.layout);
  at::Tensor average = has_skip ? at::empty_like(x, d.layout) : at::empty({0}, x.options());
  auto [mean, rstd] = group_norm_stats_outputs(x, d, eps);
  return {y, average, mean, rstd};
}

}  // namespace patchddm
