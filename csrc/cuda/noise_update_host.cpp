// Host side of the CUDA noise update and Philox noise: checks, allocation, stream,
// registration. Coefficients stay on the device (no host sync).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../noise_update_args.h"
#include "noise_update.h"
#include "torch_bridge.h"

namespace patchddm {
namespace {

void noise_update_out_cuda(const at::Tensor& x, const std::optional<at::Tensor>& eps,
                           const at::Tensor& coef, bool clip, bool add_noise, int64_t seed,
                           int64_t offset, const at::Tensor& out,
                           const std::optional<at::Tensor>& x0_out) {
  const NoiseUpdateArgs a =
      check_noise_update_out("patchddm::noise_update_out", x, eps, coef, add_noise, seed, offset, out, x0_out);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  cuda::NoiseUpdateParams p{};
  p.x = x.const_data_ptr();
  p.x_stride = x.stride(0);
  if (eps.has_value()) {
    p.eps = eps->const_data_ptr();
    p.eps_stride = eps->stride(0);
  }
  p.out = out.mutable_data_ptr();
  p.out_stride = out.stride(0);
  if (x0_out.has_value()) {
    p.x0 = x0_out->mutable_data_ptr();
    p.x0_stride = x0_out->stride(0);
  }
  p.batch = a.batch;
  p.inner = a.inner;
  p.coef_stride = a.shared_coef ? 0 : kNoiseCoefficients;
  at::Tensor device_coef;  // kept alive until the launch is queued; the allocator is stream-ordered
  if (coef.device().is_cpu() && coef.size(0) <= cuda::kInlineCoefRows) {
    // Read on the host, passed by value: no copy, no sync.
    const at::Tensor rows = coef.to(at::kDouble).contiguous();
    const double* v = rows.const_data_ptr<double>();
    for (int64_t r = 0; r < coef.size(0); ++r) {
      for (int64_t i = 0; i < kNoiseCoefficients; ++i) p.inline_coef[r][i] = v[r * kNoiseCoefficients + i];
    }
  } else {
    device_coef = coef;
    if (coef.device().is_cpu()) {
      // Pinned staging makes the upload asynchronous; the host allocator keeps the staging
      // buffer until the copy on this stream has run.
      at::Tensor staged = at::empty(coef.sizes(), coef.options().pinned_memory(true));
      staged.copy_(coef);
      device_coef = staged.to(x.device(), coef.scalar_type(), /*non_blocking=*/true);
    }
    p.coef = device_coef.const_data_ptr();
    p.coef_double = coef.scalar_type() == at::kDouble;
  }
  p.clip = clip;
  p.add_noise = add_noise;
  p.seed = add_noise ? static_cast<uint64_t>(seed) : 0;
  p.offset = add_noise ? static_cast<uint64_t>(offset) : 0;
  cuda::noise_update(p, cuda::to_dtype(x.scalar_type()), cuda::current_stream());
}

at::Tensor philox_normal_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  check_philox_normal("patchddm::philox_normal", like, seed, offset);
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  cuda::philox_normal(out.mutable_data_ptr(), out.numel(), static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset), cuda::to_dtype(out.scalar_type()),
                      cuda::current_stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CUDA, m) {
  m.impl("noise_update", &noise_update_via_out<noise_update_out_cuda>);
  m.impl("noise_update_out", &noise_update_out_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace patchddm
