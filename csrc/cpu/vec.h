// What the CPU kernel files share for their vectorised loops, as cuda/launch.cuh does for the
// CUDA ones: the choice of instruction set, and the load and store of every dtype through its
// arithmetic type.
//
// The element loops are plain loops that GCC vectorises. The extension itself is built for
// baseline x86-64, so with GCC on x86-64 each kernel file compiles its loops three times, for
// AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline (per_isa.h), and runs the copy that
// cpu_isa() chose: the best the CPU has, capped by the environment variable PATCHDDM_CPU_ISA.
// (at::vec::Vectorized would not do here: ATen chooses its instruction set per translation
// unit through CPU_CAPABILITY flags, without which it is a plain array of scalars.)
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PATCHDDM_ISA_VARIANTS 1  // `#pragma GCC target("arch=x86-64-v4")` needs GCC 11
#else
#define PATCHDDM_ISA_VARIANTS 0
#endif

#if defined(__GNUC__)
#define PATCHDDM_INLINE inline __attribute__((always_inline))
#else
#define PATCHDDM_INLINE inline
#endif

namespace patchddm::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set of the CPU kernels' loops: the best this CPU runs, capped by
// PATCHDDM_CPU_ISA (avx512, avx2 or baseline; another value is ignored with a warning). Read
// once, the first time a CPU kernel runs (cpu_isa.cpp).
Isa cpu_isa();
const char* isa_name(Isa isa);

// Runs the statements `...`, in which `isa::` names the loops of the namespace compiled for
// `choice` (isa_avx512, isa_avx2 or isa_baseline, see per_isa.h).
#if PATCHDDM_ISA_VARIANTS
#define PATCHDDM_DISPATCH_ISA(choice, ...)                  \
  do {                                                     \
    switch (choice) {                                      \
      case ::patchddm::cpu::Isa::kAvx512: {                \
        namespace isa = isa_avx512;                        \
        __VA_ARGS__;                                       \
      } break;                                             \
      case ::patchddm::cpu::Isa::kAvx2: {                  \
        namespace isa = isa_avx2;                          \
        __VA_ARGS__;                                       \
      } break;                                             \
      default: {                                           \
        namespace isa = isa_baseline;                      \
        __VA_ARGS__;                                       \
      }                                                    \
    }                                                      \
  } while (0)
#else
#define PATCHDDM_DISPATCH_ISA(choice, ...) \
  do {                                     \
    (void)(choice);                        \
    namespace isa = isa_baseline;          \
    __VA_ARGS__;                           \
  } while (0)
#endif

// Whether the CPU runs the AVX-512 subsets that the convolution kernels use (F, BW, VL), and
// AVX512-BF16 (VDPBF16PS, VCVTNEPS2BF16) beside them for bfloat16; false where the variants
// are not compiled.
inline bool cpu_has_avx512() {
#if PATCHDDM_ISA_VARIANTS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#if PATCHDDM_ISA_VARIANTS
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The mask of the first n of 16 lanes (all for n >= 16, none for n <= 0), as the AVX-512
// kernels' masked loads and stores of a channel block's remainder take it (__mmask16).
PATCHDDM_INLINE uint16_t lanes_below(int64_t n) {
  return n >= 16 ? uint16_t{0xFFFF} : n <= 0 ? uint16_t{0} : static_cast<uint16_t>((1u << n) - 1);
}

// c ? a : b through a bit mask: both sides are computed, so compilers keep loops over it
// vectorised rather than branching (they will not speculate float arithmetic into a select).
PATCHDDM_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

PATCHDDM_INLINE uint32_t float_bits(float f) { return std::bit_cast<uint32_t>(f); }
PATCHDDM_INLINE float bits_float(uint32_t u) { return std::bit_cast<float>(u); }

// Elem<T>: how the dtype T is stored (storage), computed in (acc), and converted between the
// two. Half and bfloat16 are converted with branch-free integer code (round to nearest even,
// as c10 rounds, and the same values bit for bit) because c10's half conversions branch,
// which keeps loops over them from vectorising.
template <typename T>
struct Elem {  // float and double: stored as computed
  using storage = T;
  using acc = T;
  static PATCHDDM_INLINE acc load(storage v) { return v; }
  static PATCHDDM_INLINE storage store(acc v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;
  using acc = float;
  static PATCHDDM_INLINE float load(uint16_t v) { return bits_float(static_cast<uint32_t>(v) << 16); }
  static PATCHDDM_INLINE uint16_t store(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(select_bits((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));  // NaN
  }
};

template <>
struct Elem<c10::Half> {
  using storage = uint16_t;
  using acc = float;
  static PATCHDDM_INLINE float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t bits = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa
    const uint32_t exponent = bits & (0x7C00u << 13);
    const uint32_t normal = bits + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);  // inf and NaN: exponent 255
    // zero and subnormals: m 2^-24 = (2^-14 (1 + m / 1024)) - 2^-14, exactly
    const uint32_t tiny = float_bits(bits_float(bits + (113u << 23)) - bits_float(113u << 23));
    const uint32_t magnitude =
        select_bits(exponent == (0x7C00u << 13), special, select_bits(exponent == 0, tiny, normal));
    return bits_float(magnitude | sign);
  }
  static PATCHDDM_INLINE uint16_t store(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // normal halves: rebias the exponent, round the 13 dropped bits to nearest even (a carry
    // into the exponent gives the next binade, or infinity)
    const uint32_t normal = (a - ((127u - 15u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14: adding 0.5 makes the float addition round to a multiple of 2^-24
    const uint32_t tiny = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
    const uint32_t big = select_bits(a > 0x7F800000u, 0x7E00u, 0x7C00u);  // NaN, or inf for |f| >= 2^16
    const uint32_t h = select_bits(a >= (143u << 23), big, select_bits(a < (113u << 23), tiny, normal));
    return static_cast<uint16_t>(h | sign);
  }
};

}  // namespace patchddm::cpu
