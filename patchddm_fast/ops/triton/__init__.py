"""Triton kernels of the fast ops, one module per op, each registering its ops under the
namespace patchddm_triton with torch.library.custom_op (with the same fake kernels and
autograd as the compiled ops). Imported by patchddm_fast.ops when Triton is importable; on
CPU tensors they run only under TRITON_INTERPRET=1."""
