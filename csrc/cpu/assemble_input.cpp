// PatchDDM's model input on the CPU, in one pass: for each patch b, the rows of
// [volume crop at offsets[b], 3 coordinate channels, x_t] are written straight into out.
// Work is split over output rows (b, channel, z, y); each task walks its rows in order and,
// where source and destination are contiguous across rows of a plane, copies whole runs of
// rows at once. Any input and output strides are accepted (64-bit indexing throughout).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../assemble_input_args.h"

namespace patchddm {
namespace {

constexpr int64_t kGrainElements = 32768;  // output elements per task: amortises the fork

struct Strided5 {
  const void* data;
  std::array<int64_t, 5> stride;
};

std::array<int64_t, 5> strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// n elements from src (stride ss) to dst (stride ds), converted to T through S's math type.
template <typename T, typename S>
inline void convert_run(const S* src, int64_t ss, T* dst, int64_t ds, int64_t n) {
  if constexpr (std::is_same_v<T, S>) {
    if (ss == 1 && ds == 1) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
      return;
    }
  }
  using acc_t = at::opmath_type<S>;
  if (ss == 1 && ds == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<acc_t>(src[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * ds] = static_cast<T>(static_cast<acc_t>(src[i * ss]));
}

template <typename T>
inline void fill_run(T value, T* dst, int64_t ds, int64_t n) {
  if (ds == 1) {
    std::fill_n(dst, n, value);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * ds] = value;
}

template <typename T, typename X>
void assemble_cpu_kernel(const AssembleArgs& a, const at::Tensor& volume,
                         const std::optional<at::Tensor>& x_t, const at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t d = a.patch[0], h = a.patch[1], w = a.patch[2];
  const int64_t C = a.channels, channels = a.written_channels();
  const bool shared_volume = volume.size(0) == 1;

  // Coordinates of every patch, per axis, in T: [b][z | y | x]. Computed once, so that the
  // row loop only copies (the x channel) or fills (the z and y channels).
  const int64_t per_patch = d + h + w;
  std::vector<T> table(static_cast<size_t>(a.batch * per_patch));
  for (int64_t b = 0; b < a.batch; ++b) {
    T* t = table.data() + b * per_patch;
    const int64_t len[3] = {d, h, w};
    for (int k = 0; k < 3; ++k) {
      for (int64_t i = 0; i < len[k]; ++i) {
        t[i] = static_cast<T>(coord_value<acc_t>(a.offsets[b * 3 + k] + i, a.coord[k]));
      }
      t += len[k];
    }
  }

  const T* vol = volume.const_data_ptr<T>();
  const auto vs = strides_of(volume);
  const X* xt = x_t.has_value() ? x_t->const_data_ptr<X>() : nullptr;
  const auto xs = x_t.has_value() ? strides_of(*x_t) : std::array<int64_t, 5>{};
  T* dst_base = out.mutable_data_ptr<T>();
  const auto os = strides_of(out);
  // Whether consecutive rows (y) of a plane follow each other in memory, so that a run of rows
  // is one contiguous run of elements.
  const bool out_rows = os[4] == 1 && os[3] == w;
  const bool vol_rows = vs[4] == 1 && vs[3] == w;
  const bool xt_rows = xs[4] == 1 && xs[3] == w;

  // Copies rows y0 .. y0 + n - 1 of channel c, slice z, patch b.
  auto do_rows = [&](int64_t b, int64_t c, int64_t z, int64_t y0, int64_t n) {
    T* dst = dst_base + b * os[0] + c * os[1] + z * os[2] + y0 * os[3];
    const int64_t* o = a.offsets.data() + b * 3;
    if (c < C) {
      const T* src = vol + (shared_volume ? 0 : b * vs[0]) + c * vs[1] + (o[0] + z) * vs[2] +
                     (o[1] + y0) * vs[3] + o[2] * vs[4];
      if (out_rows && vol_rows) return convert_run(src, int64_t(1), dst, int64_t(1), n * w);
      for (int64_t r = 0; r < n; ++r) convert_run(src + r * vs[3], vs[4], dst + r * os[3], os[4], w);
      return;
    }
    const T* coords = table.data() + b * per_patch;
    switch (c - C) {
      case 0:  // z: one value over the whole run
        if (out_rows) return fill_run(coords[z], dst, int64_t(1), n * w);
        for (int64_t r = 0; r < n; ++r) fill_run(coords[z], dst + r * os[3], os[4], w);
        return;
      case 1:  // y: one value per row
        for (int64_t r = 0; r < n; ++r) fill_run(coords[d + y0 + r], dst + r * os[3], os[4], w);
        return;
      case 2:  // x: the same row of values for every row
        for (int64_t r = 0; r < n; ++r) convert_run(coords + d + h, int64_t(1), dst + r * os[3], os[4], w);
        return;
      default: {
        const X* src = xt + b * xs[0] + (c - C - 3) * xs[1] + z * xs[2] + y0 * xs[3];
        if (out_rows && xt_rows) return convert_run(src, int64_t(1), dst, int64_t(1), n * w);
        for (int64_t r = 0; r < n; ++r) convert_run(src + r * xs[3], xs[4], dst + r * os[3], os[4], w);
      }
    }
  };

  const int64_t rows = a.batch * channels * d * h;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / w);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Decode the first row once, then walk: runs end at plane boundaries or the task's end.
    int64_t y = begin % h, plane = begin / h;
    int64_t z = plane % d, bc = plane / d;
    int64_t c = bc % channels, b = bc / channels;
    for (int64_t r = begin; r < end;) {
      const int64_t n = std::min(h - y, end - r);
      do_rows(b, c, z, y, n);
      r += n;
      y = 0;
      if (++z == d) {
        z = 0;
        if (++c == channels) c = 0, ++b;
      }
    }
  });
}

void assemble_input_out_cpu(const at::Tensor& volume, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& x_t, at::IntArrayRef patch_shape,
                            at::IntArrayRef coord_shape, const at::Tensor& out) {
  const AssembleArgs a =
      check_assemble_input_out("patchddm::assemble_input_out", volume, offsets, x_t, patch_shape, coord_shape, out);
  if (out.numel() == 0) return;
  const at::ScalarType x_type = x_t.has_value() ? x_t->scalar_type() : volume.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "assemble_input_cpu", [&] {
    using vol_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, "assemble_input_cpu_x_t", [&] {
      assemble_cpu_kernel<vol_t, scalar_t>(a, volume, x_t, out);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) {
  m.impl("assemble_input", &assemble_input_via_out<assemble_input_out_cpu>);
  m.impl("assemble_input_out", &assemble_input_out_cpu);
}

}  // namespace patchddm
