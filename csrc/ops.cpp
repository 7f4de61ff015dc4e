// Schemas of every patchddm op, and nothing else. Kernels register themselves per device
// (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cpp); fake kernels and autograd live in Python beside
// each op (patchddm_fast/ops/<op>.py). The math of each op is in DESIGN.md.
#include <torch/library.h>

TORCH_LIBRARY(patchddm, m) {
  // (h + skip) / 2, elementwise; both inputs of one shape and dtype.
  m.def("avg_skip(Tensor h, Tensor skip) -> Tensor");

  // u = (x [+ skip] / 2) + add[b, c]; y = silu(group_norm(u) * weight + bias).
  // Returns y, the average (x + skip) / 2 (empty without skip) and the per-(batch, group)
  // float32 statistics mean and rstd that the backward needs.
  m.def(
      "group_norm_silu_forward(Tensor x, Tensor? skip, Tensor? add, Tensor? weight, "
      "Tensor? bias, int groups, float eps) -> (Tensor out, Tensor average, Tensor mean, "
      "Tensor rstd)");
  // Gradients of the above from the saved input (x, or the average when there was a skip).
  // grad_input = input_scale * (d loss/d u + grad_average); grad_add, grad_weight and
  // grad_bias are float32 and empty when the matching forward input was None.
  m.def(
      "group_norm_silu_backward(Tensor grad_out, Tensor? grad_average, Tensor input, "
      "Tensor? add, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int groups, "
      "float input_scale) -> (Tensor grad_input, Tensor grad_add, Tensor grad_weight, "
      "Tensor grad_bias)");

  // One noise-update pass, per batch element b with coef[b] = (a, b, c, d, e, s):
  //   x0  = a * x + b * eps            (clamped to [-1, 1] when clip)
  //   out = c * x0 + d * x + e * eps + s * z,   z ~ N(0, 1) from Philox(seed, offset + index)
  // which covers the DDIM step, the DDPM step and forward noising (q_sample).
  m.def(
      "noise_update(Tensor x, Tensor? eps, Tensor coef, bool clip, bool add_noise, int seed, "
      "int offset, bool want_x0) -> (Tensor out, Tensor x0)");
  m.def(
      "noise_update_out(Tensor x, Tensor? eps, Tensor coef, bool clip, bool add_noise, "
      "int seed, int offset, Tensor(a!) out, Tensor(b!)? x0_out) -> ()");
  // Standard normal noise with the shape, dtype and device of `like`, element i being the
  // same z as noise_update draws for (seed, offset + i).
  m.def("philox_normal(Tensor like, int seed, int offset) -> Tensor");

  // Model input of one patch per batch element, in one pass:
  //   [volume channels cropped at offsets[b], 3 coordinate channels, x_t channels].
  // Coordinate k at patch voxel i is -1 + 2 * (offsets[b, k] + i) / (coord_shape[k] - 1).
  // offsets is a CPU int64 tensor (B, 3), read on the host.
  m.def(
      "assemble_input(Tensor volume, Tensor offsets, Tensor? x_t, int[] patch_shape, "
      "int[] coord_shape) -> Tensor");
  m.def(
      "assemble_input_out(Tensor volume, Tensor offsets, Tensor? x_t, int[] patch_shape, "
      "int[] coord_shape, Tensor(a!) out) -> ()");
}
