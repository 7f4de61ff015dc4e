// Registers the schema of every patchddm op, and nothing else. The schemas themselves are
// written once, in patchddm_fast/ops/schemas.def, which the Triton ops read too. Kernels
// register themselves per device: csrc/cpu/<op>.cpp, and csrc/cuda/<op>_host.cpp (argument
// checks, allocation, stream) around the kernels of csrc/cuda/<op>.cu; the argument checks
// shared by both devices are in csrc/<op>_args.h. Fake kernels and autograd live in Python
// beside each op (patchddm_fast/ops/<op>.py), with the plain-PyTorch reference that defines
// what each op computes; except group_norm_silu_forward's autograd, which is in C++
// (csrc/cpu/group_norm_silu_autograd.cpp) because the Python wrapper's cost per call was a
// tenth of the op at the network's small levels.
#include <torch/library.h>

TORCH_LIBRARY(patchddm, m) {
#define PATCHDDM_SCHEMA(schema) m.def(schema);
#include "../patchddm_fast/ops/schemas.def"
#undef PATCHDDM_SCHEMA
}
