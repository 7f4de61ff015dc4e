// Argument checks of noise_update / noise_update_out / philox_normal, shared by the CPU and
// CUDA hosts: every error names the op, the argument and what was expected.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace patchddm {

constexpr int64_t kNoiseCoefficients = 6;  // a, b, c, d, e, s of each batch element

// Contiguous within each batch element, any batch stride (a channel slice of a larger buffer
// qualifies): the layout the kernels read and write, row b starting at data + b * stride(0).
inline bool is_batch_strided(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

inline void check_batch_strided(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 0 || is_batch_strided(t), op, ": ", name,
              " must be contiguous within each batch element (", name,
              "[b].is_contiguous()); got shape ", t.sizes(), " and strides ", t.strides());
}

struct NoiseUpdateArgs {
  int64_t batch = 0;  // B: the rows of coef apply per batch element
  int64_t inner = 0;  // elements per batch element
  bool shared_coef = false;  // coef has one row for every batch element
};

inline void check_seed_offset(const char* op, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, op, ": seed must lie in [0, 2^63), got ", seed);
  TORCH_CHECK(offset >= 0, op, ": offset must lie in [0, 2^63), got ", offset);
}

inline NoiseUpdateArgs check_noise_update(const char* op, const at::Tensor& x,
                                          const std::optional<at::Tensor>& eps,
                                          const at::Tensor& coef, bool add_noise, int64_t seed,
                                          int64_t offset) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-dimensional tensor");
  check_batch_strided(op, "x", x);
  if (eps.has_value()) {
    check_same_device(op, "eps", *eps, x);
    check_same_dtype(op, "eps", *eps, x);
    check_same_shape(op, "eps", *eps, x);
    check_batch_strided(op, "eps", *eps);
  }
  NoiseUpdateArgs a;
  a.batch = x.size(0);
  a.inner = a.batch == 0 ? 0 : x.numel() / a.batch;
  // On the host (read there: no device sync) or on x's device.
  TORCH_CHECK(coef.device().is_cpu() || coef.device() == x.device(), op,
              ": coef must be on the CPU or on x's device ", x.device(), ", got ", coef.device());
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble, op,
              ": coef must be float32 or float64, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == kNoiseCoefficients &&
                  (coef.size(0) == 1 || coef.size(0) == a.batch),
              op, ": coef must have shape (1, 6) or (B, 6) with B = ", a.batch,
              " (rows a, b, c, d, e, s), got ", coef.sizes());
  TORCH_CHECK(coef.is_contiguous(), op, ": coef must be contiguous, got strides ", coef.strides());
  a.shared_coef = coef.size(0) == 1;
  if (add_noise) {
    check_seed_offset(op, seed, offset);
    // Noise indices offset + i must not wrap 64 bits (they cannot: both are below 2^63).
  }
  return a;
}

// out (and x0_out): like x, batch-strided, not overlapping each other. Either may be x (or
// eps) itself, since every element is read before it is written; partial overlap is refused.
inline void check_noise_outputs(const char* op, const at::Tensor& x,
                                const std::optional<at::Tensor>& eps, const at::Tensor& out,
                                const std::optional<at::Tensor>& x0_out) {
  auto check_one = [&](const char* name, const at::Tensor& t) {
    check_same_device(op, name, t, x);
    check_same_dtype(op, name, t, x);
    check_same_shape(op, name, t, x);
    check_batch_strided(op, name, t);
    at::assert_no_internal_overlap(t);
    at::assert_no_partial_overlap(t, x);
    if (eps.has_value()) at::assert_no_partial_overlap(t, *eps);
  };
  check_one("out", out);
  if (x0_out.has_value()) {
    check_one("x0_out", *x0_out);
    at::assert_no_overlap(out, *x0_out);
  }
}

// Every check of philox_normal.
inline void check_philox_normal(const char* op, const at::Tensor& like, int64_t seed, int64_t offset) {
  check_float(op, "like", like);
  check_seed_offset(op, seed, offset);
}

// Every check of noise_update_out.
inline NoiseUpdateArgs check_noise_update_out(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& eps,
                                              const at::Tensor& coef, bool add_noise, int64_t seed, int64_t offset,
                                              const at::Tensor& out, const std::optional<at::Tensor>& x0_out) {
  const NoiseUpdateArgs a = check_noise_update(op, x, eps, coef, add_noise, seed, offset);
  check_noise_outputs(op, x, eps, out, x0_out);
  return a;
}

// noise_update through a device's noise_update_out (OutFn): out, and x0 when want_x0 (else
// an empty tensor), allocated like x, contiguous.
template <auto OutFn>
std::tuple<at::Tensor, at::Tensor> noise_update_via_out(const at::Tensor& x, const std::optional<at::Tensor>& eps,
                                                        const at::Tensor& coef, bool clip, bool add_noise,
                                                        int64_t seed, int64_t offset, bool want_x0) {
  check_float("patchddm::noise_update", "x", x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor x0 = want_x0 ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  OutFn(x, eps, coef, clip, add_noise, seed, offset, out, want_x0 ? std::optional<at::Tensor>(x0) : std::nullopt);
  return {out, x0};
}

}  // namespace patchddm
