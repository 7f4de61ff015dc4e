// Host side of the CUDA (h + skip) / 2: checks, allocation, stream, registration.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../avg_skip_args.h"
#include "avg_skip.h"
#include "torch_bridge.h"

namespace patchddm {
namespace {

at::Tensor avg_skip_cuda(const at::Tensor& h, const at::Tensor& skip) {
  constexpr const char* op = "patchddm::avg_skip";
  check_avg_skip(op, h, skip);
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty_like(h, at::MemoryFormat::Contiguous);
  cuda::avg_skip(h.const_data_ptr(), skip.const_data_ptr(), out.mutable_data_ptr(), h.numel(),
                 cuda::to_dtype(h.scalar_type()), cuda::current_stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CUDA, m) { m.impl("avg_skip", &avg_skip_cuda); }

}  // namespace patchddm
