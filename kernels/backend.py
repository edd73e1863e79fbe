"""One backend interface, chosen at start-up by what the machine has.

A backend turns a stored (possibly quantized) tensor into the form it computes with, once, and
provides the operations the model's forward pass is written in. The NumPy reference is always
there; faster backends (C on the CPU, CUDA, TensorRT) implement the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType

from kernels import reference
from kernels.dequant import dequantize


class Backend(Protocol):
    name: str

    def weight(self, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> object: ...
    def rmsnorm(self, x, weight, eps: float): ...
    def linear(self, x, weight): ...
    def rope_tables(self, positions: np.ndarray, dim: int, theta: float): ...
    def rope(self, x, cos, sin): ...
    def attention(self, q, k, v, start: int): ...
    def swiglu(self, x, w_gate, w_up, w_down): ...


class NumpyBackend:
    """Float32 NumPy: the obviously-right reference. Dequantizes each weight once, at load, and keeps
    matrices transposed ([in, out]) for `reference.linear`."""

    name = "numpy"

    def weight(self, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
        w = dequantize(raw, qtype, shape)
        return np.ascontiguousarray(w.T if w.ndim == 2 else w, dtype=np.float32)

    rmsnorm = staticmethod(reference.rmsnorm)
    linear = staticmethod(reference.linear)
    rope_tables = staticmethod(reference.rope_tables)
    rope = staticmethod(reference.rope)
    attention = staticmethod(reference.attention)
    swiglu = staticmethod(reference.swiglu)


class UnknownBackendError(ValueError):
    pass


def _cuda_backend() -> Backend:
    """Imported only when asked for: a machine without a GPU never loads pycuda (kernels/cuda_backend.py)."""
    from kernels.cuda_backend import CudaBackend, available

    if not available():
        raise UnknownBackendError("backend 'cuda' needs an NVIDIA GPU and pycuda (pip install -e '.[cuda]')")
    return CudaBackend()


BACKENDS: dict[str, Callable[[], Backend]] = {"numpy": NumpyBackend, "cuda": _cuda_backend}


def select_backend(name: str = "auto") -> Backend:
    """The named backend, or for "auto" the fastest one this machine can run."""
    if name == "auto":
        from kernels.cuda_backend import available  # NVML and a package lookup: imports nothing of CUDA's

        name = "cuda" if available() else "numpy"
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()
