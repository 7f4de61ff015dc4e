// Host side of the CUDA GroupNorm + SiLU: checks, parameters in the arithmetic dtype,
// outputs and workspaces (from the stream-ordered caching allocator), stream, registration.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../group_norm_silu_args.h"
#include "group_norm_silu.h"
#include "torch_bridge.h"

namespace patchddm {
namespace {

// An optional small parameter (add, weight, bias) in the arithmetic dtype, contiguous; the
// returned tensor keeps the converted copy alive until the launches are queued.
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t groups,
    double eps) {
  // Contiguous tensors only (the default of the checks): the Python op copies channels-last
  // inputs to contiguous for this kernel, which has no channels-last loops (the CPU one has).
  const GroupNormDims d =
      check_group_norm_silu_forward("patchddm::group_norm_silu_forward", x, skip, add, weight, bias, groups, eps);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, average, mean, rstd;
  std::tie(y, average, mean, rstd) = group_norm_silu_forward_outputs(x, skip.has_value(), d, eps);
  if (x.numel() == 0) return {y, average, mean, rstd};
  const auto acc = group_norm_acc_type(x);
  const auto acc_options = x.options().dtype(acc);
  const at::Tensor add_acc = as_acc(add, acc), weight_acc = as_acc(weight, acc), bias_acc = as_acc(bias, acc);
  const int64_t chunks = cuda::group_norm_chunks(d.spatial);
  at::Tensor partials = at::empty({d.batch * d.channels * chunks * 2}, acc_options);
  at::Tensor coef = at::empty({d.batch * d.channels * 2}, acc_options);

  cuda::GroupNormForwardParams p{};
  p.x = x.const_data_ptr();
  p.skip = skip.has_value() ? skip->const_data_ptr() : nullptr;
  p.average = skip.has_value() ? average.mutable_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.add = ptr_or_null(add_acc);
  p.weight = ptr_or_null(weight_acc);
  p.bias = ptr_or_null(bias_acc);
  p.mean = mean.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  p.partials = partials.mutable_data_ptr();
  p.coef = coef.mutable_data_ptr();
  p.batch = d.batch;
  p.channels = d.channels;
  p.spatial = d.spatial;
  p.groups = d.groups;
  p.eps = eps;
  cuda::group_norm_silu_forward(p, cuda::to_dtype(x.scalar_type()), cuda::current_stream());
  return {y, average, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_average, const at::Tensor& input,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    double input_scale) {
  const GroupNormDims d = check_group_norm_silu_backward("patchddm::group_norm_silu_backward", grad_out, grad_average,
                                                         input, add, weight, bias, mean, rstd, groups);
  c10::cuda::CUDAGuard guard(input.device());

  const auto acc = group_norm_acc_type(input);
  const auto acc_options = input.options().dtype(acc);
  at::Tensor grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor grad_add = add.has_value() ? at::empty({d.batch, d.channels}, acc_options) : at::empty({0}, acc_options);
  at::Tensor channel = at::empty({d.batch, d.channels, 3}, acc_options);
  if (input.numel() == 0) {
    grad_add.zero_();
    channel.zero_();
  } else {
    const at::Tensor add_acc = as_acc(add, acc), weight_acc = as_acc(weight, acc), bias_acc = as_acc(bias, acc);
    const int64_t chunks = cuda::group_norm_chunks(d.spatial);
    at::Tensor partials = at::empty({d.batch * d.channels * chunks * 3}, acc_options);
    at::Tensor coef = at::empty({d.batch * d.channels * 3}, acc_options);

    cuda::GroupNormBackwardParams p{};
    p.grad_out = grad_out.const_data_ptr();
    p.grad_average = grad_average.has_value() ? grad_average->const_data_ptr() : nullptr;
    p.input = input.const_data_ptr();
    p.add = ptr_or_null(add_acc);
    p.weight = ptr_or_null(weight_acc);
    p.bias = ptr_or_null(bias_acc);
    p.mean = mean.const_data_ptr();
    p.rstd = rstd.const_data_ptr();
    p.grad_input = grad_input.mutable_data_ptr();
    p.grad_add = add.has_value() ? grad_add.mutable_data_ptr() : nullptr;
    p.partials = partials.mutable_data_ptr();
    p.channel = channel.mutable_data_ptr();
    p.coef = coef.mutable_data_ptr();
    p.batch = d.batch;
    p.channels = d.channels;
    p.spatial = d.spatial;
    p.groups = d.groups;
    p.input_scale = input_scale;
    cuda::group_norm_silu_backward(p, cuda::to_dtype(input.scalar_type()), cuda::current_stream());
  }
  // grad_bias = sum over the batch of sum dz, grad_weight of sum dz * xhat.
  at::Tensor grad_weight = weight.has_value() ? channel.select(2, 1).sum(0) : at::empty({0}, acc_options);
  at::Tensor grad_bias = bias.has_value() ? channel.select(2, 0).sum(0) : at::empty({0}, acc_options);
  return {grad_input, grad_add, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CUDA, m) {
  m.impl("group_norm_silu_forward", &group_norm_silu_forward_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace patchddm
