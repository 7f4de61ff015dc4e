// The fused noise update and Philox noise on the CPU.
//
// Work is split over the flat element range (at::parallel_for); each task walks its range row
// by row (a row = one batch element, contiguous) in blocks of kBlock elements. Per block, the
// noise is drawn first into a small buffer that stays in L1 (Philox in groups of four, one
// vectorised loop), then one vectorised loop reads x and eps, and writes out and x0.
//
// The loops that do the arithmetic (noise_update_loops.h) are compiled for AVX-512, AVX2 and
// baseline x86-64, each call running the copy that cpu_isa() chose, and half and bfloat16 are
// converted in them as vec.h says.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../noise_update_args.h"
#include "../philox.h"
#include "vec.h"

namespace patchddm {
namespace {

constexpr int64_t kBlock = 1024;           // elements per block: the noise buffer is 4 KiB
constexpr int64_t kGroups = kBlock / 4 + 1;  // Philox groups a block can touch
constexpr int64_t kGrain = 16384;          // elements per task: amortises the fork

template <typename A>
struct Coef {
  A a, b, c, d, e, s, lo, hi;
};

// The element loops, once per instruction set.
#define PATCHDDM_LOOPS "noise_update_loops.h"
#include "per_isa.h"

struct Rows {
  char* data;
  int64_t stride;  // bytes between batch elements
};

Rows rows_of(const at::Tensor& t) {
  return {static_cast<char*>(const_cast<void*>(t.const_data_ptr())), t.stride(0) * t.element_size()};
}

template <typename P, bool kEps, bool kNoise, bool kX0>
void noise_update_kernel(const NoiseUpdateArgs& a, const at::Tensor& x,
                         const std::optional<at::Tensor>& eps, const at::Tensor& coef, bool clip,
                         uint64_t seed, uint64_t offset, const at::Tensor& out,
                         const std::optional<at::Tensor>& x0_out) {
  using A = typename P::acc;
  using S = typename P::storage;
  // Coefficient rows, read once (float32 or float64) and applied in the math type.
  std::vector<Coef<A>> rows(static_cast<size_t>(coef.size(0)));
  const at::Tensor coef64 = coef.to(at::kDouble).contiguous();
  const double* c = coef64.const_data_ptr<double>();
  const A inf = std::numeric_limits<A>::infinity();
  for (size_t r = 0; r < rows.size(); ++r) {
    const double* v = c + r * kNoiseCoefficients;
    rows[r] = {static_cast<A>(v[0]), static_cast<A>(v[1]), static_cast<A>(v[2]), static_cast<A>(v[3]),
               static_cast<A>(v[4]), static_cast<A>(v[5]), clip ? A(-1) : -inf, clip ? A(1) : inf};
  }
  const Rows xr = rows_of(x), outr = rows_of(out);
  const Rows er = eps.has_value() ? rows_of(*eps) : Rows{nullptr, 0};
  const Rows x0r = x0_out.has_value() ? rows_of(*x0_out) : Rows{nullptr, 0};
  const int64_t inner = a.inner;
  const cpu::Isa choice = cpu::cpu_isa();  // here, on the calling thread: it may warn once
  at::parallel_for(0, a.batch * inner, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float buffer[4 * kGroups];
    const float* z = nullptr;
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / inner, j = i - b * inner;
      const int64_t n = std::min({end - i, inner - j, kBlock});
      auto at_row = [&](const Rows& r) { return reinterpret_cast<S*>(r.data + b * r.stride) + j; };
      PATCHDDM_DISPATCH_ISA(choice,
                            if constexpr (kNoise) z = isa::normals(seed, offset + static_cast<uint64_t>(i), n, buffer);
                            isa::update_run<P, kEps, kNoise, kX0>(at_row(xr), kEps ? at_row(er) : nullptr, z,
                                                                  at_row(outr), kX0 ? at_row(x0r) : nullptr, n,
                                                                  rows[a.shared_coef ? 0 : b]));
      i += n;
    }
  });
}

void noise_update_out_cpu(const at::Tensor& x, const std::optional<at::Tensor>& eps,
                          const at::Tensor& coef, bool clip, bool add_noise, int64_t seed,
                          int64_t offset, const at::Tensor& out,
                          const std::optional<at::Tensor>& x0_out) {
  const NoiseUpdateArgs a =
      check_noise_update_out("patchddm::noise_update_out", x, eps, coef, add_noise, seed, offset, out, x0_out);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_update_cpu", [&] {
    // The variants as compile-time flags, so that each inner loop is branch-free.
    using P = cpu::Elem<scalar_t>;
    auto run = [&]<bool kEps, bool kNoise, bool kX0>() {
      noise_update_kernel<P, kEps, kNoise, kX0>(a, x, eps, coef, clip, seed, offset, out, x0_out);
    };
    const int variant = (eps.has_value() ? 4 : 0) | (add_noise ? 2 : 0) | (x0_out.has_value() ? 1 : 0);
    switch (variant) {
      case 0: run.template operator()<false, false, false>(); break;
      case 1: run.template operator()<false, false, true>(); break;
      case 2: run.template operator()<false, true, false>(); break;
      case 3: run.template operator()<false, true, true>(); break;
      case 4: run.template operator()<true, false, false>(); break;
      case 5: run.template operator()<true, false, true>(); break;
      case 6: run.template operator()<true, true, false>(); break;
      default: run.template operator()<true, true, true>(); break;
    }
  });
}

at::Tensor philox_normal_cpu(const at::Tensor& like, int64_t seed, int64_t offset) {
  check_philox_normal("patchddm::philox_normal", like, seed, offset);
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_normal_cpu", [&] {
    using P = cpu::Elem<scalar_t>;
    auto* data = reinterpret_cast<typename P::storage*>(out.mutable_data_ptr<scalar_t>());
    const cpu::Isa choice = cpu::cpu_isa();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      alignas(64) float buffer[4 * kGroups];
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t m = std::min(end - i, kBlock);
        PATCHDDM_DISPATCH_ISA(choice, isa::convert_run<P>(isa::normals(seed, offset + static_cast<uint64_t>(i), m,
                                                                        buffer),
                                                           data + i, m));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) {
  m.impl("noise_update", &noise_update_via_out<noise_update_out_cpu>);
  m.impl("noise_update_out", &noise_update_out_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace patchddm
