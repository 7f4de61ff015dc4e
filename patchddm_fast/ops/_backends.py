"""Which implementation of a fast op runs for a tensor on a given device.

Backends:
  cpp     the compiled C++ kernels of patchddm_fast._C, for CPU tensors
  cuda    the compiled CUDA kernels of patchddm_fast._C, for CUDA tensors
  triton  the Triton kernels of patchddm_fast.ops.triton, for CUDA tensors (and for CPU
          tensors when TRITON_INTERPRET=1, which is how the tests run them without a GPU)
  torch   the plain-PyTorch reference of each op: always available, slowest

The default is the first available backend of the op's preference order (the fastest one
measured, see benchmarks/RESULTS.md). PATCHDDM_BACKEND=<name>, read when patchddm_fast is
imported, or set_backend(<name>) overrides it wherever that backend applies to the device.
A backend that is asked for but unavailable is skipped with one log line saying why.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .._extension import EXTENSION

logger = logging.getLogger("patchddm_fast")

BACKENDS = ("cpp", "cuda", "triton", "torch")
_DEVICE_BACKENDS = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailable(RuntimeError):
    pass


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


TRITON_IMPORTABLE, TRITON_REASON = _triton_status()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class FastOp:
    """The backends of one public op.

    name: the op's one name;
    module: the name of its files (default: name): its Python module patchddm_fast.ops.<module>,
        its Triton module patchddm_fast.ops.triton.<module>, its kernels csrc/cpu/<module>.cpp
        and csrc/cuda/<module>.cu (group_norm_silu_apply lives with group_norm_silu);
    native: name of the patchddm::<native> schema whose kernels stand for the op in _C;
    cuda_order: preference on CUDA tensors, fastest first; an op without a CUDA kernel leaves
        "cuda" out.

    Availability and defaults are worked out once, when patchddm_fast.ops has been imported
    (finalize), so that choosing a backend at call time is a dictionary lookup that
    torch.compile traces without a graph break.
    """

    registry: dict[str, "FastOp"] = {}

    def __init__(self, name: str, native: str,
                 cuda_order: tuple[str, ...] = ("cuda", "triton", "torch"), module: str | None = None):
        self.name, self.native, self.cuda_order = name, native, cuda_order
        self._triton_module_name = f"patchddm_fast.ops.triton.{module or name}"
        self._why: dict[tuple[str, str], str | None] = {}
        self._default: dict[str, str] = {}
        FastOp.registry[name] = self

    # -- availability, worked out once -------------------------------------------------------
    def finalize(self) -> None:
        """Imports the Triton module (registering its ops) and records what can run where."""
        triton_error = self._import_triton()
        for device_type, backends in _DEVICE_BACKENDS.items():
            for backend in backends:
                self._why[(backend, device_type)] = self._probe(backend, device_type, triton_error)
        self.choose_defaults()

    def _import_triton(self) -> str | None:
        if not TRITON_IMPORTABLE:
            return TRITON_REASON
        try:
            importlib.import_module(self._triton_module_name)
        except Exception as exc:
            error = f"{self._triton_module_name} failed to import: {exc}"
            logger.warning("patchddm_fast: Triton backend of %s disabled: %s", self.name, error)
            return error
        return None

    def _probe(self, backend: str, device_type: str, triton_error: str | None) -> str | None:
        if backend == "torch":
            return None
        if backend == "cuda" and "cuda" not in self.cuda_order:
            return f"{self.name} has no CUDA kernel (CUDA tensors run it on {self.cuda_order[0]})"
        if backend in ("cpp", "cuda"):
            key = "CPU" if backend == "cpp" else "CUDA"
            if not EXTENSION.loaded:
                return f"compiled extension not loaded: {EXTENSION.error}"
            if not EXTENSION.has_kernel(self.native, key):
                why = f"patchddm_fast._C has no {key} kernel for {self.native}"
                if key == "CUDA" and not EXTENSION.has_kernel("avg_skip", "CUDA"):
                    why += " (it was built without CUDA: see README.md, 'Build switches')"
                return why
            return None
        if triton_error is not None:
            return triton_error
        if device_type == "cpu" and not TRITON_INTERPRET:
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        return None

    def why_unavailable(self, backend: str, device_type: str) -> str | None:
        """None when `backend` can run this op on `device_type` tensors, else the reason."""
        if (backend, device_type) not in self._why:
            return f"the {backend} backend does not run on {device_type} tensors"
        return self._why[(backend, device_type)]

    def available(self, device_type: str) -> list[str]:
        return [b for b in _DEVICE_BACKENDS.get(device_type, ()) if self.why_unavailable(b, device_type) is None]

    def choose_defaults(self) -> None:
        """The default per device: the override where it can run, else the preference order."""
        for device_type in _DEVICE_BACKENDS:
            order = self.cuda_order if device_type == "cuda" else ("cpp", "torch")
            override = _OVERRIDE["backend"]
            if override is not None and override in _DEVICE_BACKENDS[device_type]:
                why = self.why_unavailable(override, device_type)
                if why is None:
                    self._default[device_type] = override
                    continue
                logger.warning("patchddm_fast: %s: backend %r (PATCHDDM_BACKEND/set_backend) skipped "
                               "on %s: %s", self.name, override, device_type, why)
            for backend in order:
                why = self.why_unavailable(backend, device_type)
                if why is None:
                    self._default[device_type] = backend
                    break
                logger.info("patchddm_fast: %s on %s: %s backend skipped: %s", self.name, device_type,
                            backend, why)

    # -- choice at call time -----------------------------------------------------------------
    def resolve(self, device: torch.device, requested: str | None = None) -> str:
        """The backend that runs this op on `device`.

        `requested` (a call's backend= argument) must be available, else BackendUnavailable.
        """
        if requested is None:
            return self._default.get(device.type, "torch")
        if requested not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {requested!r}; choose from {BACKENDS}")
        why = self.why_unavailable(requested, device.type)
        if why is not None:
            raise BackendUnavailable(f"{self.name}: backend {requested!r} unavailable: {why}")
        return requested


def _read_override() -> str | None:
    value = os.environ.get("PATCHDDM_BACKEND", "").strip().lower() or None
    if value is not None and value not in BACKENDS:
        logger.warning("patchddm_fast: PATCHDDM_BACKEND=%r ignored; choose from %s", value, BACKENDS)
        return None
    return value


_OVERRIDE: dict[str, str | None] = {"backend": _read_override()}


def set_backend(name: str | None) -> None:
    """Overrides the default backend of every op wherever `name` applies (None: defaults)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    _OVERRIDE["backend"] = name
    for op in FastOp.registry.values():
        op.choose_defaults()


def get_backend_override() -> str | None:
    return _OVERRIDE["backend"]
