// Autograd of patchddm::group_norm_silu_forward, in C++ for every device (the Autograd key),
// with the gradients from patchddm::group_norm_silu_backward; and the refusal of
// group_norm_silu_apply(_out) and group_norm_silu_stats, which have none, to run on tensors that require grad.
//
// It does what patchddm_fast/ops/group_norm_silu.py's register_autograd does for the Triton
// ops (the same saved tensors, the same outputs), without Python on the way: measured on the
// CPU, the Python autograd wrapper added about 0.1 ms to each forward + backward, which at the
// paper's smallest norm (116 channels at 16^3, about 1 ms in all) was a tenth of the op.
// Saved: the normalised input (x, or the average when there is a skip) and the statistics;
// an unused output's gradient arrives undefined rather than as zeros (materialize off).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../group_norm_silu_args.h"

namespace patchddm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs call_forward(const at::Tensor& x, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& add,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t groups,
                     double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("patchddm::group_norm_silu_forward", "")
                             .typed<Outputs(const at::Tensor&, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, int64_t, double)>();
  return op.call(x, skip, add, weight, bias, groups, eps);
}

Outputs call_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_average,
                      const at::Tensor& input, const std::optional<at::Tensor>& add,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& mean, const at::Tensor& rstd, int64_t groups, double input_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("patchddm::group_norm_silu_backward", "")
          .typed<Outputs(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(grad_out, grad_average, input, add, weight, bias, mean, rstd, groups, input_scale);
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& skip,
                               const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, average, mean, rstd] = call_forward(x, skip, add, weight, bias, groups, eps);
    const bool has_skip = skip.has_value() && skip->defined();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_skip"] = has_skip;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({has_skip ? average : x, add.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {y, average, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &add = saved[1], &weight = saved[2], &bias = saved[3];
    const bool has_skip = ctx->saved_data["has_skip"].toBool();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    // The gradients in the saved input's layout, which the kernels read them in (the CPU kernel
    // reads channels-last tensors as they are; the CUDA one gets contiguous inputs only).
    const at::MemoryFormat layout = group_norm_layout(input);
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous(layout) : at::zeros_like(input, layout);
    std::optional<at::Tensor> grad_average;
    if (has_skip && grads[1].defined()) grad_average = grads[1].contiguous(layout);
    auto [grad_input, grad_add, grad_weight, grad_bias] =
        call_backward(grad_out, grad_average, input, optional(add), optional(weight), optional(bias), saved[4],
                      saved[5], groups, has_skip ? 0.5 : 1.0);
    return {grad_input,
            has_skip ? grad_input : at::Tensor(),
            add.defined() ? grad_add.to(add.scalar_type()) : at::Tensor(),
            weight.defined() ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            bias.defined() ? grad_bias.to(bias.scalar_type()) : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

Outputs group_norm_silu_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                                         const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  auto out = GroupNormSiLUFunction::apply(x, skip, add, weight, bias, groups, eps);
  return {out[0], out[1], out[2], out[3]};
}

// group_norm_silu_apply(_out) and group_norm_silu_stats have no gradient: on a tensor that requires grad while grad mode
// is on they refuse, as the Python op does, rather than return a result whose gradient would
// silently be missing (PyTorch's fallback only warns, at backward); else they run below autograd.
void without_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& value = (*stack)[stack->size() - args.size() + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op.schema().name(),
                  " is not differentiable: ", args[i].name(),
                  " requires grad; call it under torch.no_grad() (or pass detached tensors)");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, Autograd, m) {
  m.impl("group_norm_silu_forward", &group_norm_silu_forward_autograd);
  m.impl("group_norm_silu_apply", torch::CppFunction::makeFromBoxedFunction<&without_autograd>());
  m.impl("group_norm_silu_apply_out", torch::CppFunction::makeFromBoxedFunction<&without_autograd>());
  m.impl("group_norm_silu_stats", torch::CppFunction::makeFromBoxedFunction<&without_autograd>());
}

}  // namespace patchddm
