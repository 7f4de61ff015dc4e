// The instruction set of the CPU kernels' loops (vec.h), and the op cpu_isa that reports it.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "vec.h"

namespace patchddm::cpu {
namespace {

Isa best_supported() {
#if PATCHDDM_ISA_VARIANTS
  __builtin_cpu_init();
  // The features of x86-64-v3 and -v4 that the compiler uses for these loops.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
#else
  return Isa::kBaseline;
#endif
}

Isa choose() {
  const Isa best = best_supported();
  const char* cap = std::getenv("PATCHDDM_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string value(cap);
  Isa limit;
  if (value == "avx512") {
    limit = Isa::kAvx512;
  } else if (value == "avx2") {
    limit = Isa::kAvx2;
  } else if (value == "baseline") {
    limit = Isa::kBaseline;
  } else {
    TORCH_WARN("patchddm: PATCHDDM_CPU_ISA=", value, " ignored: choose avx512, avx2 or baseline; using ",
               isa_name(best));
    return best;
  }
  return std::min(best, limit);  // a cap: never more than the CPU has
}

std::string cpu_isa_op() { return isa_name(cpu_isa()); }

}  // namespace

Isa cpu_isa() {
  static const Isa isa = choose();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// No tensor argument to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(patchddm, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa_op); }

}  // namespace patchddm::cpu
