"""Triton kernels of the fast ops, one module per op (named as the op), each registering its
ops under the namespace patchddm_triton with the schemas of ../schemas.def (the compiled ops'
own), the same argument checks, fake kernels and autograd as the compiled ops. Imported by
patchddm_fast.ops when Triton is importable; on CPU tensors they run only under
TRITON_INTERPRET=1."""
