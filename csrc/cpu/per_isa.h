// Compiles the loops of the header named by PATCHDDM_LOOPS once per instruction set, into the
// namespaces isa_avx512 (x86-64-v4), isa_avx2 (x86-64-v3) and isa_baseline, where
// PATCHDDM_DISPATCH_ISA (vec.h) finds them. Include it in the kernel file's namespace, after
// every header the loops need: the loops header includes nothing itself, since it lands in
// each namespace. No include guard: each kernel file includes it once, for its own loops.
#if PATCHDDM_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
#include PATCHDDM_LOOPS
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
#include PATCHDDM_LOOPS
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_baseline {
#include PATCHDDM_LOOPS
}  // namespace isa_baseline

#undef PATCHDDM_LOOPS
