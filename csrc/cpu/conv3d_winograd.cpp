// A 3x3x3 convolution (stride 1, padding 1, one group) on AVX-512 CPUs by Winograd's minimal
// filtering F(2x2x2, 3x3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016): 8 products per output and channel pair instead of 27. In bfloat16 (CPUs
// with AVX512-BF16), where oneDNN's convolutions already run at the CPU's dot-product rate (29
// channels 64^3: about 400 GFLOP/s on 2 Zen 4 cores, whose peak is 470), fewer products is what
// is left to gain; in float32 oneDNN runs at about two thirds of the FMA rate and the same
// algorithm gains 2-2.5x. The same op computes a convolution's input gradient: the convolution
// of grad_out with the weights flipped and transposed.
//
// In one dimension, an output pair y = (y0, y1) from four inputs d and three taps g is
//   y = A^T [(G g) * (B^T d)],  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1],
// and in three, each matrix applies along every dimension: a tile of 2x2x2 outputs takes a
// 4x4x4 input block, and the 64 "points" p of the transformed block are independent, so
//   M[tile, p, o] = sum over c of V[tile, p, c] * U[p, c, o]     (64 matrix products)
// with V = B^T d B (input transform) and U = G g G^T (weight transform), then y = A^T M A.
//
// Numerics: V and U are computed in float32 (in bfloat16 then rounded to bfloat16 for the
// products, as autocast rounds the input and the weights), the products are summed in float32
// and the output is rounded to its dtype once. In float32 that is float32 rounding (3e-7 of the
// largest output at 29 channels, oneDNN's 1.2e-6). In bfloat16 the roundings of V and U,
// values larger than the input (sums of up to 8), make the rms error 2.2x-3.4x a direct
// bfloat16 convolution's. tests/ops/test_conv3d_winograd.py checks both against the bound that
// the transforms' absolute values give.
//
// Work: blocks of up to 16 tiles along w (one task each), with per-thread scratch that stays
// in the L2 cache: the block's V (64 points x 16 tiles x channels), its M (16 tiles x 64
// points x output channels, float32), then the output transform writes the block's outputs.
// The products run as VDPBF16PS (a broadcast pair of input channels (2c, 2c + 1) of one tile
// against 16 output channels' weight pairs) or FMA (one float32 channel against 16 output
// channels' weights), 8 tiles x up to 3 vectors of output channels in registers. Every output
// is computed by one task, in one order: the same bits on any number of threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec.h"

#if PATCHDDM_ISA_VARIANTS
#include <immintrin.h>
#endif

namespace patchddm {
namespace {

constexpr const char* kOp = "patchddm::conv3d_winograd";
constexpr int64_t kLanes = 16;       // float32 lanes of a 512-bit vector
constexpr int64_t kPoints = 64;      // 4 x 4 x 4 transformed points per tile
constexpr int64_t kBlockTiles = 16;  // tiles per task
constexpr int kGroup = 8;            // tiles per micro-kernel call
constexpr int kMaxVecs = 3;          // output vectors per micro-kernel call: 8 x 3 accumulators

struct Shape {
  int64_t batch, depth, height, width, in_ch, out_ch;
  int64_t pack;                                                      // channels per word of V and U
  int64_t words() const { return (in_ch + pack - 1) / pack; }        // V's words per tile and point
  int64_t in_pad() const { return pack * words(); }                  // V's channels (zero padded)
  int64_t in_vecs() const { return (in_ch + kLanes - 1) / kLanes; }
  int64_t out_vecs() const { return (out_ch + kLanes - 1) / kLanes; }
  int64_t out_pad() const { return out_vecs() * kLanes; }
  int64_t tiles_d() const { return (depth + 1) / 2; }
  int64_t tiles_h() const { return (height + 1) / 2; }
  int64_t tiles_w() const { return (width + 1) / 2; }
  int64_t blocks_w() const { return (tiles_w() + kBlockTiles - 1) / kBlockTiles; }
};

// The two precisions. Bf16: bfloat16 tensors, V and U rounded to bfloat16, two channels per
// 32-bit word (VDPBF16PS). F32: float32 tensors, V and U in float32, one channel per word (FMA).
struct Bf16 {
  using Elem = uint16_t;
  static constexpr int64_t kPack = 2;
  static uint16_t round(float f) { return c10::BFloat16(f).x; }
};
struct F32 {
  using Elem = float;
  static constexpr int64_t kPack = 1;
  static float round(float f) { return f; }
};

// U[p][word][o]: the weights transformed along w, then h, then d, in float32, rounded once to
// D's element; a word holds channels (pack word, ..., pack word + pack - 1) of one o. Output
// channels [o_begin, o_end) of out_pad, each writing all its own words (zeros for padding).
template <class D>
void transform_weights(const float* weight, const Shape& s, int64_t o_begin, int64_t o_end, typename D::Elem* u) {
  for (int64_t o = o_begin; o < o_end; ++o)
    for (int64_t c = 0; c < s.in_pad(); ++c) {
      float t[4][4][4] = {};
      if (o < s.out_ch && c < s.in_ch) {
        const float* g = weight + (o * s.in_ch + c) * 27;
        float a[3][3][4], b[3][4][4];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            const float* r = g + i * 9 + j * 3;
            a[i][j][0] = r[0];
            a[i][j][1] = 0.5f * (r[0] + r[1] + r[2]);
            a[i][j][2] = 0.5f * (r[0] - r[1] + r[2]);
            a[i][j][3] = r[2];
          }
        for (int i = 0; i < 3; ++i)
          for (int x = 0; x < 4; ++x) {
            b[i][0][x] = a[i][0][x];
            b[i][1][x] = 0.5f * (a[i][0][x] + a[i][1][x] + a[i][2][x]);
            b[i][2][x] = 0.5f * (a[i][0][x] - a[i][1][x] + a[i][2][x]);
            b[i][3][x] = a[i][2][x];
          }
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 4; ++x) {
            t[0][y][x] = b[0][y][x];
            t[1][y][x] = 0.5f * (b[0][y][x] + b[1][y][x] + b[2][y][x]);
            t[2][y][x] = 0.5f * (b[0][y][x] - b[1][y][x] + b[2][y][x]);
            t[3][y][x] = b[2][y][x];
          }
      }
      for (int64_t p = 0; p < kPoints; ++p)
        u[((p * s.words() + c / D::kPack) * s.out_pad() + o) * D::kPack + c % D::kPack] =
            D::round(t[p / 16][p / 4 % 4][p % 4]);
    }
}

#if PATCHDDM_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's _mm512_setzero_si512, as in conv3d_weight_grad

using cpu::lanes_below;

inline __m512 load_elem(const uint16_t* p, __mmask16 m) {  // bfloat16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load_elem(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline void store_elem(uint16_t* p, __mmask16 m, __m512 v) {  // rounded to bfloat16
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline void store_elem(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

// B^T along one line of four.
inline void input_line(__m512& d0, __m512& d1, __m512& d2, __m512& d3) {
  const __m512 r0 = _mm512_sub_ps(d0, d2), r1 = _mm512_add_ps(d1, d2), r2 = _mm512_sub_ps(d2, d1),
               r3 = _mm512_sub_ps(d1, d3);
  d0 = r0, d1 = r1, d2 = r2, d3 = r3;
}

// V of one tile (corner (z0, y0, x0) of its input block, in input coordinates) into
// v[p * kBlockTiles * in_pad + c]; buf: 64 x 16 floats of scratch. Edge: the block may reach
// outside the volume (zeros there); the tiles inside skip the tests.
template <bool Edge, class Elem>
void transform_tile(const Elem* x, const Shape& s, int64_t b, int64_t z0, int64_t y0, int64_t x0, Elem* v,
                    float* buf) {
  const int64_t depth = s.depth, height = s.height, width = s.width, in_ch = s.in_ch, in_pad = s.in_pad();
  const int64_t row = width * in_ch, vstride = kBlockTiles * in_pad, in_vecs = s.in_vecs();
  // an index, not a pointer: at the edges it points outside the tensor, where nothing is read
  const int64_t corner = ((b * depth + z0) * height + y0) * row + x0 * in_ch;
  for (int64_t cv = 0; cv < in_vecs; ++cv) {
    const __mmask16 m = lanes_below(in_ch - cv * kLanes);
    for (int z = 0; z < 4; ++z) {
      __m512 d[4][4];
      for (int y = 0; y < 4; ++y) {
        const bool row_in = !Edge || (z0 + z >= 0 && z0 + z < depth && y0 + y >= 0 && y0 + y < height);
        const int64_t line = corner + (z * height + y) * row + cv * kLanes;
        for (int i = 0; i < 4; ++i)
          d[y][i] = !Edge || (row_in && x0 + i >= 0 && x0 + i < width) ? load_elem(x + line + i * in_ch, m)
                                                                       : _mm512_setzero_ps();
        input_line(d[y][0], d[y][1], d[y][2], d[y][3]);  // along w
      }
      for (int i = 0; i < 4; ++i) {
        input_line(d[0][i], d[1][i], d[2][i], d[3][i]);  // along h
        for (int y = 0; y < 4; ++y) _mm512_storeu_ps(buf + ((z * 4 + y) * 4 + i) * kLanes, d[y][i]);
      }
    }
    const __mmask16 store = lanes_below(in_pad - cv * kLanes);  // the pad channel's zeros too
    for (int yx = 0; yx < 16; ++yx) {
      __m512 e[4];
      for (int z = 0; z < 4; ++z) e[z] = _mm512_loadu_ps(buf + (z * 16 + yx) * kLanes);
      input_line(e[0], e[1], e[2], e[3]);  // along d
      for (int z = 0; z < 4; ++z) store_elem(v + (z * 16 + yx) * vstride + cv * kLanes, store, e[z]);
    }
  }
}

// M's tile stride: 64 points of out_pad floats and one cache line, so that the 8 tiles a
// micro-kernel call stores to do not all fall in one L1 set (8 KiB apart at 32 channels).
inline int64_t tile_stride(int64_t out_pad) { return kPoints * out_pad + kLanes; }

// M[t][p][o] = sum over words of V[p][t][word] . U[p][word][o], for every point p, the groups
// of kGroup tiles [0, groups * kGroup) and output vectors [v0, v0 + NV). Words: 32-bit, a pair
// of bfloat16 channels (VDPBF16PS) or one float32 channel (FMA).
template <class D, int NV>
void products(const Shape& s, const uint32_t* v, const uint32_t* u, int64_t v0, int64_t groups, float* m) {
  const int64_t words = s.words(), out_pad = s.out_pad(), vstride = kBlockTiles * words;
  for (int64_t p = 0; p < kPoints; ++p)
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* vp = v + p * vstride + g * kGroup * words;
      const uint32_t* up = u + p * words * out_pad + v0 * kLanes;
      float* mp = m + g * kGroup * tile_stride(out_pad) + p * out_pad + v0 * kLanes;
      __m512 acc[kGroup][NV];
#pragma GCC unroll 8
      for (int t = 0; t < kGroup; ++t)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[t][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < words; ++k) {
        __m512i w[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_si512(up + k * out_pad + j * kLanes);
#pragma GCC unroll 8
        for (int t = 0; t < kGroup; ++t) {
          const __m512i a = _mm512_set1_epi32(static_cast<int>(vp[t * words + k]));
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j)
            if constexpr (D::kPack == 2)
              acc[t][j] = _mm512_dpbf16_ps(acc[t][j], (__m512bh)a, (__m512bh)w[j]);
            else
              acc[t][j] = _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(w[j]), acc[t][j]);
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < kGroup; ++t)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(mp + t * tile_stride(out_pad) + j * kLanes, acc[t][j]);
    }
}

using Products = void (*)(const Shape&, const uint32_t*, const uint32_t*, int64_t, int64_t, float*);
template <class D>
constexpr Products kProducts[kMaxVecs + 1] = {nullptr, &products<D, 1>, &products<D, 2>, &products<D, 3>};

// A^T along one line of four: (m0 + m1 + m2, m1 - m2 - m3).
inline void output_line(__m512 m0, __m512 m1, __m512 m2, __m512 m3, __m512& y0, __m512& y1) {
  y0 = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
  y1 = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
}

// The outputs of one tile (corner (z0, y0, x0)) from its M (64 points x out_pad floats), with
// the bias, rounded to the output's dtype; outputs outside the volume (odd sizes) are not written.
template <class Elem>
void output_tile(const float* m, const float* bias, const Shape& s, int64_t b, int64_t z0, int64_t y0, int64_t x0,
                 Elem* out) {
  for (int64_t ov = 0; ov < s.out_vecs(); ++ov) {
    const __mmask16 mask = lanes_below(s.out_ch - ov * kLanes);
    const float* mo = m + ov * kLanes;
    auto at = [&](int p) { return _mm512_loadu_ps(mo + p * s.out_pad()); };
    __m512 a[2][16];  // along d: (z', y, x)
    for (int yx = 0; yx < 16; ++yx) output_line(at(yx), at(16 + yx), at(32 + yx), at(48 + yx), a[0][yx], a[1][yx]);
    const __m512 bv = _mm512_loadu_ps(bias + ov * kLanes);
    for (int z = 0; z < 2; ++z) {
      if (z0 + z >= s.depth) continue;
      __m512 c[2][4];  // along h: (y', x)
      for (int i = 0; i < 4; ++i) output_line(a[z][i], a[z][4 + i], a[z][8 + i], a[z][12 + i], c[0][i], c[1][i]);
      for (int y = 0; y < 2; ++y) {
        if (y0 + y >= s.height) continue;
        __m512 r[2];  // along w
        output_line(c[y][0], c[y][1], c[y][2], c[y][3], r[0], r[1]);
        for (int i = 0; i < 2; ++i) {
          if (x0 + i >= s.width) continue;
          Elem* dst = out + (((b * s.depth + z0 + z) * s.height + y0 + y) * s.width + x0 + i) * s.out_ch + ov * kLanes;
          store_elem(dst, mask, _mm512_add_ps(r[i], bv));
        }
      }
    }
  }
}

template <class D>
struct Scratch {
  std::vector<typename D::Elem> v;  // [p][tile][in_pad]
  std::vector<float> m;             // [tile][p][out_pad], tiles tile_stride apart
  std::vector<float> buf;           // 64 x 16
};

// One task: tiles [tw0, tw0 + n) of tile row (b, td, th).
template <class D>
void block(const typename D::Elem* x, const uint32_t* u, const float* bias, const Shape& s, int64_t b, int64_t td,
           int64_t th, int64_t tw0, Scratch<D>& sc, typename D::Elem* out) {
  using Elem = typename D::Elem;
  const int64_t n = std::min(kBlockTiles, s.tiles_w() - tw0);
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t vstride = kBlockTiles * s.in_pad();
  sc.v.resize(kPoints * vstride);
  sc.m.resize(kBlockTiles * tile_stride(s.out_pad()));
  sc.buf.resize(kPoints * kLanes);
  const int64_t z0 = 2 * td - 1, y0 = 2 * th - 1;
  const bool edge_zy = z0 < 0 || z0 + 4 > s.depth || y0 < 0 || y0 + 4 > s.height;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t x0 = 2 * (tw0 + t) - 1;
    Elem* vt = sc.v.data() + t * s.in_pad();
    if (edge_zy || x0 < 0 || x0 + 4 > s.width)
      transform_tile<true>(x, s, b, z0, y0, x0, vt, sc.buf.data());
    else
      transform_tile<false>(x, s, b, z0, y0, x0, vt, sc.buf.data());
  }
  for (int64_t t = n; t < groups * kGroup; ++t)  // the last group's missing tiles: zeros, results unused
    for (int64_t p = 0; p < kPoints; ++p)
      std::fill_n(sc.v.data() + p * vstride + t * s.in_pad(), s.in_pad(), Elem{0});
  const auto* v = reinterpret_cast<const uint32_t*>(sc.v.data());
  for (int64_t v0 = 0; v0 < s.out_vecs(); v0 += kMaxVecs) {
    const int nv = static_cast<int>(std::min<int64_t>(kMaxVecs, s.out_vecs() - v0));
    kProducts<D>[nv](s, v, u, v0, groups, sc.m.data());
  }
  for (int64_t t = 0; t < n; ++t)
    output_tile(sc.m.data() + t * tile_stride(s.out_pad()), bias, s, b, 2 * td, 2 * th, 2 * (tw0 + t), out);
}

#pragma GCC pop_options
#endif  // PATCHDDM_ISA_VARIANTS

void check_arguments(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kFloat, kOp,
              ": input must be bfloat16 or float32, got ", input.scalar_type());
  if (input.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(cpu::cpu_has_avx512_bf16(), kOp,
                ": bfloat16 needs an x86-64 CPU with AVX512-BF16 and a GCC build of the extension; this one "
                "has neither or not both (use aten.convolution instead)");
  } else {
    TORCH_CHECK(cpu::cpu_has_avx512(), kOp,
                ": float32 needs an x86-64 CPU with AVX-512 and a GCC build of the extension; this one has "
                "neither or not both (use aten.convolution instead)");
  }
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), kOp,
              ": input and weight must be CPU tensors, got ", input.device(), " and ", weight.device());
  TORCH_CHECK(input.dim() == 5, kOp, ": input must be 5-D (B, C, D, H, W), got shape ", input.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat, kOp,
              ": weight must be bfloat16 or float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 5 && weight.size(1) == input.size(1) && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(4) == 3,
              kOp, ": weight must have shape (O, ", input.size(1), ", 3, 3, 3) for input ", input.sizes(), ", got ",
              weight.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu(), kOp, ": bias must be a CPU tensor, got one on ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": bias must have shape (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 || bias->scalar_type() == at::kFloat, kOp,
                ": bias must be bfloat16 or float32, got ", bias->scalar_type());
  }
}

// The convolution in precision D: input (channels last) of D's dtype into out.
template <class D>
void convolve(const at::Tensor& input, const at::Tensor& weight, const std::vector<float>& bias, const Shape& s,
              at::Tensor& out) {
  using Elem = typename D::Elem;
  std::vector<Elem> u(kPoints * s.in_pad() * s.out_pad());
  // In parallel: at 116 channels one thread's transform took as long as a third of the products.
  at::parallel_for(0, s.out_pad(), 1, [&](int64_t first, int64_t last) {
    transform_weights<D>(weight.const_data_ptr<float>(), s, first, last, u.data());
  });
#if PATCHDDM_ISA_VARIANTS
  const auto* x = static_cast<const Elem*>(input.const_data_ptr());
  auto* y = static_cast<Elem*>(out.mutable_data_ptr());
  const auto* uw = reinterpret_cast<const uint32_t*>(u.data());
  const int64_t rows = s.tiles_d() * s.tiles_h(), tasks = s.batch * rows * s.blocks_w();
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    thread_local Scratch<D> scratch;  // per thread, kept between calls (no fresh pages each step)
    for (int64_t k = first; k < last; ++k) {
      const int64_t row = k / s.blocks_w(), b = row / rows, dh = row % rows;
      block<D>(x, uw, bias.data(), s, b, dh / s.tiles_h(), dh % s.tiles_h(), k % s.blocks_w() * kBlockTiles, scratch,
               y);
    }
  });
#endif
}

at::Tensor conv3d_winograd_cpu(const at::Tensor& input_arg, const at::Tensor& weight_arg,
                               const std::optional<at::Tensor>& bias_arg) {
  check_arguments(input_arg, weight_arg, bias_arg);
  const at::Tensor input = input_arg.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor weight = weight_arg.to(at::kFloat).contiguous();
  const bool half = input.scalar_type() == at::kBFloat16;
  const Shape s{input.size(0), input.size(2), input.size(3), input.size(4), input.size(1), weight.size(0),
                half ? Bf16::kPack : F32::kPack};
  at::Tensor out = at::empty({s.batch, s.out_ch, s.depth, s.height, s.width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (out.numel() == 0) return out;
  std::vector<float> bias(s.out_pad(), 0.f);
  if (bias_arg) {
    const at::Tensor b = bias_arg->to(at::kFloat).contiguous();
    std::copy_n(b.const_data_ptr<float>(), s.out_ch, bias.begin());
  }
  if (half)
    convolve<Bf16>(input, weight, bias, s, out);
  else
    convolve<F32>(input, weight, bias, s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) { m.impl("conv3d_winograd", &conv3d_winograd_cpu); }

}  // namespace patchddm
