// Host side of the CUDA model-input assembly: checks, offsets (read on the host, passed by
// value or through a small pinned-memory upload, never a device sync), allocation, stream,
// registration.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../assemble_input_args.h"
#include "assemble_input.h"
#include "torch_bridge.h"

namespace patchddm {
namespace {

void copy_strides(const at::Tensor& t, int64_t* stride) {
  for (int k = 0; k < 5; ++k) stride[k] = t.stride(k);
}

void assemble_input_out_cuda(const at::Tensor& volume, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& x_t, at::IntArrayRef patch_shape,
                             at::IntArrayRef coord_shape, const at::Tensor& out) {
  const AssembleArgs a =
      check_assemble_input_out("patchddm::assemble_input_out", volume, offsets, x_t, patch_shape, coord_shape, out);
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(volume.device());

  cuda::AssembleParams p{};
  p.volume = volume.const_data_ptr();
  copy_strides(volume, p.volume_stride);
  p.shared_volume = volume.size(0) == 1;
  p.x_t = x_t.has_value() ? x_t->const_data_ptr() : nullptr;
  if (x_t.has_value()) copy_strides(*x_t, p.x_t_stride);
  p.x_t_dtype = cuda::to_dtype(x_t.has_value() ? x_t->scalar_type() : volume.scalar_type());
  p.out = out.mutable_data_ptr();
  copy_strides(out, p.out_stride);
  p.batch = a.batch;
  p.channels = a.channels;
  p.extra = a.extra;
  std::copy(a.patch.begin(), a.patch.end(), p.patch);
  std::copy(a.coord.begin(), a.coord.end(), p.coord);

  at::Tensor device_offsets;  // kept alive until the launch is queued; the allocator is stream-ordered
  if (a.batch <= cuda::kInlinePatches) {
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int k = 0; k < 3; ++k) p.inline_offsets[b][k] = a.offsets[b * 3 + k];
    }
  } else {
    // Pinned staging makes the upload asynchronous; the host allocator keeps the staging
    // buffer until the copy on this stream has run.
    at::Tensor staged = at::empty({a.batch, 3}, offsets.options().pinned_memory(true));
    std::copy(a.offsets.begin(), a.offsets.end(), staged.mutable_data_ptr<int64_t>());
    device_offsets = staged.to(volume.device(), at::kLong, /*non_blocking=*/true);
    p.offsets_device = device_offsets.const_data_ptr<int64_t>();
  }
  cuda::assemble_input(p, cuda::to_dtype(volume.scalar_type()), cuda::current_stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CUDA, m) {
  m.impl("assemble_input", &assemble_input_via_out<assemble_input_out_cuda>);
  m.impl("assemble_input_out", &assemble_input_out_cuda);
}

}  // namespace patchddm
