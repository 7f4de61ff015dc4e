// (h + skip) / 2 on the CPU: a parallel, auto-vectorised elementwise loop in float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../avg_skip_args.h"

namespace patchddm {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: large enough to amortise the fork

template <typename T>
void avg_skip_loop(const T* h, const T* skip, T* out, int64_t n) {
  using acc_t = at::opmath_type<T>;  // float, or double for double
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<T>((static_cast<acc_t>(h[i]) + static_cast<acc_t>(skip[i])) * acc_t(0.5));
    }
  });
}

at::Tensor avg_skip_cpu(const at::Tensor& h, const at::Tensor& skip) {
  constexpr const char* op = "patchddm::avg_skip";
  check_avg_skip(op, h, skip);
  at::Tensor out = at::empty_like(h, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "avg_skip_cpu", [&] {
    avg_skip_loop<scalar_t>(h.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), h.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) { m.impl("avg_skip", &avg_skip_cpu); }

}  // namespace patchddm
