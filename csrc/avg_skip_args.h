// Argument checks of avg_skip, shared by the CPU and CUDA hosts: every error names the op,
// the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace patchddm {

// h and skip: one float dtype, shape and device, both contiguous (the kernels run over flat
// memory).
inline void check_avg_skip(const char* op, const at::Tensor& h, const at::Tensor& skip) {
  check_float(op, "h", h);
  check_same_dtype(op, "skip", skip, h);
  check_same_shape(op, "skip", skip, h);
  check_same_device(op, "skip", skip, h);
  check_contiguous(op, "h", h);
  check_contiguous(op, "skip", skip);
}

}  // namespace patchddm
