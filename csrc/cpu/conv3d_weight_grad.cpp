// The weight gradient of a 3x3x3 convolution (stride 1, padding 1, one group) in bfloat16 on
// CPUs with AVX512-BF16 and no AMX, where it is the slowest part of a training step: oneDNN
// runs it with its older jit kernel at about half the speed of the same convolution's forward
// (benchmarks/conv_weight_grad.py; with AMX oneDNN has a brgemm kernel and keeps the job).
//
//   grad_weight[o, c, kd, kh, kw] = sum over b, d, h, w of
//       grad_out[b, o, d, h, w] * input[b, c, d + kd - 1, h + kh - 1, w + kw - 1]   (zero outside)
//
// VDPBF16PS adds the products of two pairs of bfloat16 to each float32 lane, so the sum over
// positions runs two positions at a time: rows h and h + 1 of a plane (a row pair). Per output
// plane:
//  - go2: grad_out with the two rows of each pair interleaved, 16 output channels per vector
//    (out_ch padded to whole vectors with zeros): one vector holds (go[h][w][o], go[h+1][w][o])
//    for 16 channels o;
//  - xp: the input plane zero-padded by one on every side, each element paired with the one a
//    row below it, (x[h'][w'][c], x[h'+1][w'][c]) as one 32-bit word; the input pair that meets
//    the row pair (h, h + 1) at tap (kh, kw) is xp[h + kh][w + kw], one broadcast, whatever the
//    tap (pairing along rows needs no second parity for the shifts along w). Three padded input
//    planes (d - 1, d, d + 1) are kept in a ring, each built once per slice.
//  - micro: for a block of output channels (NV vectors, at most 4) and input channels (IT: whole
//    tiles of 8, 4, 3 or 2 by NV, then one tile of the rest), the 3 x IT x NV float accumulators
//    of the three kw taps stay in registers over the whole plane, then add into the slice's
//    partial sums.
// Slices of consecutive planes run in parallel, each into its own partial sums, added in slice
// order at the end: the split depends on the shape alone, so the bits do not depend on the
// number of threads. The result is float32, not rounded to bfloat16 (oneDNN rounds its result
// to the weights' bfloat16). The bias gradient, the sum of grad_out per channel, comes with it
// (from the same pass over grad_out; ATen's float32 sum of a channels-last bfloat16 tensor took
// half as long as this whole kernel).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "vec.h"

#if PATCHDDM_ISA_VARIANTS
#include <immintrin.h>
#endif

namespace patchddm {
namespace {

constexpr const char* kOp = "patchddm::conv3d_weight_grad";
constexpr int64_t kLanes = 16;          // float32 lanes of a 512-bit vector: output channels per vector
// Slices: at least 4 planes each (a slice rebuilds two input planes and zeroes and adds its
// partial sums: at 116 channels, 16^3, slices of 1-2 planes made the whole kernel 2.4x slower
// than slices of 8, measured while the final sum was still scalar), at most 16, and at most
// 16 MiB of partial sums (one slice always).
constexpr int64_t kSlicePlanes = 4;
constexpr int64_t kMaxSlices = 16;
constexpr int64_t kMaxPartialBytes = int64_t{16} << 20;
constexpr int64_t kGrain = 32768;  // floats per task of the final sum
constexpr int kMaxChunk = 4;            // output-channel vectors per micro-kernel call

// Input channels per micro-kernel call for a block of nv output vectors: 3 x it x nv
// accumulators (24 or 27) plus nv vectors of grad_out and one broadcast fit the 32 registers.
constexpr int kInTile[kMaxChunk + 1] = {0, 8, 4, 3, 2};

struct Shape {
  int64_t batch, depth, height, width, in_ch, out_ch;
  int64_t out_vecs;   // vectors of 16 output channels
  int64_t row_pairs;  // ceil(height / 2)
  int64_t planes() const { return batch * depth; }
  int64_t out_pad() const { return out_vecs * kLanes; }
  int64_t xp_plane() const { return (height + 2) * (width + 2) * in_ch; }  // 32-bit words
  int64_t go2_plane() const { return row_pairs * width * out_vecs * kLanes; }
  int64_t weight_sums() const { return 27 * in_ch * out_pad(); }  // floats: (tap, c, o)
  int64_t partial() const { return weight_sums() + out_pad(); }     // then the bias's (o)
};

#if PATCHDDM_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// GCC 12's own _mm512_setzero_si512 (x = x) trips -Wmaybe-uninitialized where it inlines.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

using cpu::lanes_below;

// (lo, hi) 16-bit values of up to 16 channels (the first n) as 32-bit words lo | hi << 16;
// a null row reads as zeros.
inline __m512i pair_words(const uint16_t* lo, const uint16_t* hi, __mmask16 m) {
  const __m512i a = lo ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo)) : _mm512_setzero_si512();
  const __m512i b = hi ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi)), 16)
                       : _mm512_setzero_si512();
  return _mm512_or_si512(a, b);
}

// xp of padded plane p (input plane p - 1 of batch b; all zeros outside the volume).
void build_xp(const uint16_t* x, const Shape& s, int64_t b, int64_t p, uint32_t* out) {
  std::memset(out, 0, sizeof(uint32_t) * s.xp_plane());
  const int64_t d = p - 1;
  if (d < 0 || d >= s.depth) return;
  const int64_t row = s.width * s.in_ch;
  const uint16_t* plane = x + (b * s.depth + d) * s.height * row;
  for (int64_t hp = 0; hp < s.height + 2; ++hp) {  // padded row hp pairs input rows hp - 1 and hp
    const uint16_t* lo = hp - 1 >= 0 && hp - 1 < s.height ? plane + (hp - 1) * row : nullptr;
    const uint16_t* hi = hp < s.height ? plane + hp * row : nullptr;
    if (!lo && !hi) continue;
    uint32_t* dst = out + (hp * (s.width + 2) + 1) * s.in_ch;
    for (int64_t w = 0; w < s.width; ++w) {
      for (int64_t c = 0; c < s.in_ch; c += kLanes) {
        const int64_t i = w * s.in_ch + c;
        _mm512_mask_storeu_epi32(dst + w * s.in_ch + c, lanes_below(s.in_ch - c),
                                 pair_words(lo ? lo + i : nullptr, hi ? hi + i : nullptr, lanes_below(s.in_ch - c)));
      }
    }
  }
}

// go2 of output plane d of batch b: (row pair, w, output vector) -> 16 words; and the plane's
// grad_out summed per channel (the bias gradient's share), added into bias (out_pad floats).
void build_go2(const uint16_t* go, const Shape& s, int64_t b, int64_t d, uint32_t* out, float* plane_sum,
               float* bias) {
  const int64_t row = s.width * s.out_ch;
  const uint16_t* plane = go + (b * s.depth + d) * s.height * row;
  std::fill(plane_sum, plane_sum + s.out_pad(), 0.f);
  for (int64_t r = 0; r < s.row_pairs; ++r) {
    const uint16_t* lo = plane + 2 * r * row;
    const uint16_t* hi = 2 * r + 1 < s.height ? lo + row : nullptr;  // odd height: zeros
    for (int64_t w = 0; w < s.width; ++w) {
      for (int64_t v = 0; v < s.out_vecs; ++v) {
        const int64_t i = w * s.out_ch + v * kLanes;
        const __m512i pair = pair_words(lo + i, hi ? hi + i : nullptr, lanes_below(s.out_ch - v * kLanes));
        _mm512_storeu_si512(out + ((r * s.width + w) * s.out_vecs + v) * kLanes, pair);
        // bfloat16 is float32's upper half: the low value shifted up, the high one masked.
        const __m512 both = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)),
                                          _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(-65536))));
        float* p = plane_sum + v * kLanes;
        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), both));
      }
    }
  }
  for (int64_t o = 0; o < s.out_pad(); ++o) bias[o] += plane_sum[o];
}

// Adds one output plane's terms for output vectors [v0, v0 + NV) and input channels [c0, c0 + IT)
// into acc (tap, c, o). xp[kd]: the padded input plane d + kd - 1 (padded index d + kd).
template <int NV, int IT>
void micro(const Shape& s, const uint32_t* go2, int64_t v0, int64_t c0, const uint32_t* const* xp, float* acc) {
  const int64_t xrow = (s.width + 2) * s.in_ch;
  for (int kd = 0; kd < 3; ++kd) {
    for (int kh = 0; kh < 3; ++kh) {
      __m512 sum[3][IT][NV];
      for (int kw = 0; kw < 3; ++kw)
        for (int i = 0; i < IT; ++i)
          for (int v = 0; v < NV; ++v) sum[kw][i][v] = _mm512_setzero_ps();
      for (int64_t r = 0; r < s.row_pairs; ++r) {
        const uint32_t* x_row = xp[kd] + (2 * r + kh) * xrow + c0;
        const uint32_t* g_row = go2 + (r * s.width * s.out_vecs + v0) * kLanes;
        for (int64_t w = 0; w < s.width; ++w) {
          __m512bh g[NV];
          for (int v = 0; v < NV; ++v) g[v] = (__m512bh)_mm512_loadu_si512(g_row + (w * s.out_vecs + v) * kLanes);
          const uint32_t* x_at = x_row + w * s.in_ch;
          for (int kw = 0; kw < 3; ++kw)
            for (int i = 0; i < IT; ++i) {
              const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_at[kw * s.in_ch + i]));
              for (int v = 0; v < NV; ++v) sum[kw][i][v] = _mm512_dpbf16_ps(sum[kw][i][v], g[v], xb);
            }
        }
      }
      for (int kw = 0; kw < 3; ++kw)
        for (int i = 0; i < IT; ++i)
          for (int v = 0; v < NV; ++v) {
            float* p = acc + ((kd * 9 + kh * 3 + kw) * s.in_ch + c0 + i) * s.out_pad() + (v0 + v) * kLanes;
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), sum[kw][i][v]));
          }
    }
  }
}

// The micro-kernel of nv output vectors and it input channels (it <= kInTile[nv]).
using Micro = void (*)(const Shape&, const uint32_t*, int64_t, int64_t, const uint32_t* const*, float*);
template <int NV, int... IT>
constexpr std::array<Micro, 9> micro_row(std::integer_sequence<int, IT...>) {
  return {nullptr, (IT + 1 <= kInTile[NV] ? &micro<NV, (IT + 1 <= kInTile[NV] ? IT + 1 : 1)> : nullptr)...};
}
constexpr std::array<std::array<Micro, 9>, kMaxChunk + 1> kMicro = {
    std::array<Micro, 9>{}, micro_row<1>(std::make_integer_sequence<int, 8>{}),
    micro_row<2>(std::make_integer_sequence<int, 8>{}), micro_row<3>(std::make_integer_sequence<int, 8>{}),
    micro_row<4>(std::make_integer_sequence<int, 8>{})};

// Every (output block, input tile) of one plane: whole tiles of kInTile[nv] input channels,
// then one tile of the rest (no padded channels computed).
void plane_sums(const Shape& s, const uint32_t* go2, const uint32_t* const* xp, float* acc) {
  for (int64_t v0 = 0; v0 < s.out_vecs; v0 += kMaxChunk) {
    const int nv = static_cast<int>(std::min<int64_t>(kMaxChunk, s.out_vecs - v0));
    const int tile = kInTile[nv];
    int64_t c0 = 0;
    for (; c0 + tile <= s.in_ch; c0 += tile) kMicro[nv][tile](s, go2, v0, c0, xp, acc);
    if (c0 < s.in_ch) kMicro[nv][s.in_ch - c0](s, go2, v0, c0, xp, acc);
  }
}

// Planes [begin, end) into acc (zeroed here), with the caller's scratch for xp and go2.
void slice_sums(const uint16_t* x, const uint16_t* go, const Shape& s, int64_t begin, int64_t end, float* acc,
                std::vector<uint32_t>& ring, std::vector<uint32_t>& go2, std::vector<float>& plane_sum) {
  std::fill(acc, acc + s.partial(), 0.f);
  ring.resize(3 * s.xp_plane());
  go2.resize(s.go2_plane());
  plane_sum.resize(s.out_pad());
  int64_t held[3] = {-1, -1, -1};  // which padded plane (batch * (depth + 2) + index) each slot holds
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t b = plane / s.depth, d = plane % s.depth;
    const uint32_t* xp[3];
    for (int kd = 0; kd < 3; ++kd) {
      const int64_t id = b * (s.depth + 2) + d + kd;
      uint32_t* slot = ring.data() + (id % 3) * s.xp_plane();
      if (held[id % 3] != id) {
        build_xp(x, s, b, d + kd, slot);
        held[id % 3] = id;
      }
      xp[kd] = slot;
    }
    build_go2(go, s, b, d, go2.data(), plane_sum.data(), acc + s.weight_sums());
    plane_sums(s, go2.data(), xp, acc);
  }
}

#pragma GCC pop_options
#endif  // PATCHDDM_ISA_VARIANTS

void check_arguments(const at::Tensor& input, const at::Tensor& grad_out) {
  TORCH_CHECK(cpu::cpu_has_avx512_bf16(), kOp,
              ": needs an x86-64 CPU with AVX512-BF16 and a GCC build of the extension; this one has "
              "neither or not both (use aten.convolution_backward instead)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"input", input}, {"grad_out", grad_out}}) {
    TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, kOp, ": ", name, " must be bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 5, kOp, ": ", name, " must be 5-D (B, C, D, H, W), got shape ", t.sizes());
  }
  TORCH_CHECK(input.size(0) == grad_out.size(0) && input.sizes().slice(2) == grad_out.sizes().slice(2), kOp,
              ": grad_out has shape ", grad_out.sizes(), ", which does not match input ", input.sizes(),
              " (a 3x3x3 convolution with stride 1 and padding 1 keeps the batch and the spatial size)");
}

std::tuple<at::Tensor, at::Tensor> conv3d_weight_grad_cpu(const at::Tensor& input_arg, const at::Tensor& grad_out_arg) {
  check_arguments(input_arg, grad_out_arg);
  // Channels last: a position's channels are consecutive, as the vectors want them.
  const at::Tensor input = input_arg.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor grad_out = grad_out_arg.contiguous(at::MemoryFormat::ChannelsLast3d);
  Shape s{input.size(0), input.size(2), input.size(3), input.size(4), input.size(1), grad_out.size(1), 0, 0};
  s.out_vecs = (s.out_ch + kLanes - 1) / kLanes;
  s.row_pairs = (s.height + 1) / 2;

  at::Tensor out = at::empty({s.out_ch, s.in_ch, 3, 3, 3}, input.options().dtype(at::kFloat));
  at::Tensor grad_bias = at::empty({s.out_ch}, out.options());
  if (s.out_ch == 0) return {out, grad_bias};
  const int64_t planes = s.planes();
  const int64_t slices = std::max<int64_t>(
      1, std::min({planes / kSlicePlanes, kMaxSlices, kMaxPartialBytes / (s.partial() * int64_t{sizeof(float)})}));
  const int64_t per_slice = planes == 0 ? 0 : (planes + slices - 1) / slices;
  at::Tensor partial = at::empty({slices, s.partial()}, out.options());
  float* sums = partial.mutable_data_ptr<float>();
#if PATCHDDM_ISA_VARIANTS
  const auto* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const auto* go = reinterpret_cast<const uint16_t*>(grad_out.const_data_ptr<at::BFloat16>());
  at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
    // Per thread and kept between calls: no page faults of fresh buffers in every step.
    thread_local std::vector<uint32_t> ring, go2;
    thread_local std::vector<float> plane_sum;
    for (int64_t k = first; k < last; ++k)
      slice_sums(x, go, s, std::min(planes, k * per_slice), std::min(planes, (k + 1) * per_slice),
                 sums + k * s.partial(), ring, go2, plane_sum);
  });
#endif
  // partial[0] += partial[k] for k = 1, 2, ... in slice order, then out[o, c, tap] = partial[0][tap, c, o].
  at::parallel_for(0, s.partial(), kGrain, [&](int64_t first, int64_t last) {
    for (int64_t k = 1; k < slices; ++k) {
      const float* add = sums + k * s.partial();
      for (int64_t i = first; i < last; ++i) sums[i] += add[i];
    }
  });
  float* o_ptr = out.mutable_data_ptr<float>();
  for (int64_t o = 0; o < s.out_ch; ++o)
    for (int64_t c = 0; c < s.in_ch; ++c)
      for (int64_t tap = 0; tap < 27; ++tap) o_ptr[(o * s.in_ch + c) * 27 + tap] = sums[(tap * s.in_ch + c) * s.out_pad() + o];
  std::copy(sums + s.weight_sums(), sums + s.weight_sums() + s.out_ch, grad_bias.mutable_data_ptr<float>());
  return {out, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) { m.impl("conv3d_weight_grad", &conv3d_weight_grad_cpu); }

}  // namespace patchddm
