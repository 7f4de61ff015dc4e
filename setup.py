"""Build of patchddm_fast and its compiled extension patchddm_fast._C.

CPU kernels are always built. CUDA kernels are built whenever nvcc and a CUDA-enabled torch
are present, even on a machine without a GPU, so that every .cu file is compiled by the
ordinary build. Switches (environment variables):

  PATCHDDM_NO_CUDA=1      never build CUDA kernels
  PATCHDDM_FORCE_CUDA=1   fail unless CUDA kernels can be built
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX")
  CUDA_HOME               CUDA toolkit root (default: found from nvcc, see find_cuda_home)
  MAX_JOBS                parallel compile jobs (default: number of CPUs)
  PATCHDDM_DEBUG=1        -O0 -g builds
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_cuda_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def nvcc_wrapper_target(nvcc):
    """The real nvcc behind a shell wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"(/\S+/bin/nvcc)\b", head)
    return match.group(1).decode() if match else None


def find_cuda_home():
    """CUDA_HOME, checked: a folder with bin/nvcc *and* include/cuda_runtime.h.

    torch guesses CUDA_HOME as the parent of the folder holding the first nvcc on PATH; when
    that nvcc is a wrapper in /usr/local/bin, the guess is /usr/local and the build then looks
    for headers and libraries in the wrong place. We follow links and wrappers instead.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if is_cuda_root(explicit) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (os.path.realpath(nvcc), nvcc_wrapper_target(nvcc)):
            if path:
                candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(path))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if is_cuda_root(c)), None)


def cuda_decision():
    """(build_cuda, reason) for this machine and the switches."""
    if env_flag("PATCHDDM_NO_CUDA"):
        return False, "PATCHDDM_NO_CUDA is set"
    import torch

    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif os.environ.get("CUDA_HOME") is None:
        reason = "no CUDA toolkit (nvcc with include/cuda_runtime.h) found; set CUDA_HOME"
    else:
        return True, f"nvcc in {os.environ['CUDA_HOME']}, torch CUDA {torch.version.cuda}"
    if env_flag("PATCHDDM_FORCE_CUDA"):
        sys.exit(f"patchddm_fast: PATCHDDM_FORCE_CUDA=1 but CUDA kernels cannot be built: {reason}")
    return False, reason


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home and not env_flag("PATCHDDM_NO_CUDA"):
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    build_cuda, reason = cuda_decision()
    print(f"patchddm_fast: CUDA kernels {'ON' if build_cuda else 'OFF'} ({reason})")

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = env_flag("PATCHDDM_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # TORCH_ASSERT_ONLY_METHOD_OPERATORS keeps each translation unit to the few ATen headers it
    # names, which roughly quarters the compile time of a file that includes torch headers.
    cxx = opt + ["-fopenmp", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", "-Wall", "-Wno-unknown-pragmas"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not build_cuda:
        return [CppExtension("patchddm_fast._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"patchddm_fast: CUDA architectures {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    # nvcc rejects -g0 (its host debug flag is plain -g), so it gets only the -O level.
    nvcc = [opt[0]] + (["-g"] if debug else []) + ["-lineinfo", "--expt-relaxed-constexpr"]
    return [CUDAExtension("patchddm_fast._C", sources,
                          define_macros=[("PATCHDDM_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    use_ninja = shutil.which("ninja") is not None
    if not use_ninja:
        print("patchddm_fast: ninja not found, compiling one file at a time (pip install ninja)")
    return BuildExtension.with_options(use_ninja=use_ninja)


setup(
    packages=find_packages(include=["patchddm_fast", "patchddm_fast.*"]),
    # The op schemas: compiled into _C from csrc/ops.cpp and read at run time by the Triton ops.
    package_data={"patchddm_fast.ops": ["schemas.def"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
