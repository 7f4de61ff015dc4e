// Argument checks of assemble_input / assemble_input_out, shared by the CPU and CUDA hosts:
// every error names the op, the argument and what was expected.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "checks.h"
#include "coord_value.h"

namespace patchddm {

struct AssembleArgs {
  int64_t batch = 0;     // patches B
  int64_t channels = 0;  // image channels C
  int64_t extra = 0;     // x_t channels (0 without x_t)
  std::array<int64_t, 3> patch{}, coord{};
  std::vector<int64_t> offsets;  // B * 3, read on the host

  int64_t written_channels() const { return channels + 3 + extra; }
};

inline std::array<int64_t, 3> as_triple(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 3, op, ": ", name, " must have 3 entries (D, H, W), got ", v);
  return {v[0], v[1], v[2]};
}

inline AssembleArgs check_assemble_input(const char* op, const at::Tensor& volume,
                                         const at::Tensor& offsets,
                                         const std::optional<at::Tensor>& x_t,
                                         at::IntArrayRef patch_shape,
                                         at::IntArrayRef coord_shape) {
  check_float(op, "volume", volume);
  TORCH_CHECK(volume.dim() == 5, op, ": volume must be (B, C, D, H, W), got shape ", volume.sizes());
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 2 &&
                  offsets.size(1) == 3,
              op, ": offsets must be a CPU int64 tensor of shape (B, 3) (read on the host), got ",
              offsets.scalar_type(), " of shape ", offsets.sizes(), " on ", offsets.device());
  AssembleArgs a;
  a.batch = offsets.size(0);
  a.channels = volume.size(1);
  TORCH_CHECK(volume.size(0) == 1 || volume.size(0) == a.batch, op, ": volume has batch ",
              volume.size(0), " but offsets give ", a.batch, " patches (use batch 1 to share it)");
  a.patch = as_triple(op, "patch_shape", patch_shape);
  a.coord = as_triple(op, "coord_shape", coord_shape);
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(a.patch[k] >= 1, op, ": patch_shape must be positive, got ", patch_shape);
    TORCH_CHECK(a.coord[k] >= 1 && a.coord[k] <= kMaxCoordSize, op,
                ": coord_shape entries must lie in [1, 2^23], got ", coord_shape);
  }
  auto acc = offsets.accessor<int64_t, 2>();  // any strides
  a.offsets.resize(a.batch * 3);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int k = 0; k < 3; ++k) {
      const int64_t o = acc[b][k];
      TORCH_CHECK(o >= 0 && o + a.patch[k] <= volume.size(2 + k) && o + a.patch[k] <= a.coord[k], op,
                  ": patch ", b, " of shape ", patch_shape, " at offset (", acc[b][0], ", ", acc[b][1],
                  ", ", acc[b][2], ") does not fit in the volume of spatial shape ",
                  volume.sizes().slice(2), " and coord_shape ", coord_shape, " (axis ", k, ")");
      a.offsets[b * 3 + k] = o;
    }
  }
  if (x_t.has_value()) {
    const at::Tensor& x = *x_t;
    check_float(op, "x_t", x);
    check_same_device(op, "x_t", x, volume);
    TORCH_CHECK(x.dim() == 5 && x.size(0) == a.batch && x.size(2) == a.patch[0] &&
                    x.size(3) == a.patch[1] && x.size(4) == a.patch[2],
                op, ": x_t has shape ", x.sizes(), ", expected (", a.batch, ", C, ", a.patch[0], ", ",
                a.patch[1], ", ", a.patch[2], ")");
    a.extra = x.size(1);
  }
  return a;
}

// out: (B, C + 3 + Cx, *patch) of volume's dtype; without x_t it may have more channels,
// which are left untouched.
inline void check_assemble_out(const char* op, const AssembleArgs& a, const at::Tensor& volume,
                               const std::optional<at::Tensor>& x_t, const at::Tensor& out) {
  check_same_device(op, "out", out, volume);
  check_same_dtype(op, "out", out, volume);
  const int64_t channels = a.written_channels();
  TORCH_CHECK(out.dim() == 5 && out.size(0) == a.batch && out.size(2) == a.patch[0] &&
                  out.size(3) == a.patch[1] && out.size(4) == a.patch[2] &&
                  (x_t.has_value() ? out.size(1) == channels : out.size(1) >= channels),
              op, ": out has shape ", out.sizes(), ", expected (", a.batch, ", ",
              x_t.has_value() ? "" : ">= ", channels, ", ", a.patch[0], ", ", a.patch[1], ", ",
              a.patch[2], ")");
  // Parallel writers must not meet in memory, and reads must not see our own writes.
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, volume);
  if (x_t.has_value()) at::assert_no_overlap(out, *x_t);
}

// Every check of assemble_input_out.
inline AssembleArgs check_assemble_input_out(const char* op, const at::Tensor& volume, const at::Tensor& offsets,
                                             const std::optional<at::Tensor>& x_t, at::IntArrayRef patch_shape,
                                             at::IntArrayRef coord_shape, const at::Tensor& out) {
  const AssembleArgs a = check_assemble_input(op, volume, offsets, x_t, patch_shape, coord_shape);
  check_assemble_out(op, a, volume, x_t, out);
  return a;
}

// assemble_input through a device's assemble_input_out (OutFn), into a new contiguous tensor
// of volume's dtype.
template <auto OutFn>
at::Tensor assemble_input_via_out(const at::Tensor& volume, const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& x_t, at::IntArrayRef patch_shape,
                                  at::IntArrayRef coord_shape) {
  const AssembleArgs a =
      check_assemble_input("patchddm::assemble_input", volume, offsets, x_t, patch_shape, coord_shape);
  at::Tensor out = at::empty({a.batch, a.written_channels(), a.patch[0], a.patch[1], a.patch[2]},
                             volume.options().memory_format(at::MemoryFormat::Contiguous));
  OutFn(volume, offsets, x_t, patch_shape, coord_shape, out);
  return out;
}

}  // namespace patchddm
