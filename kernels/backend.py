"""One backend interface, chosen at start-up by what the machine has.

A backend turns a stored (possibly quantized) tensor into the form it computes with, once, and
provides the operations the model's forward pass is written in. The NumPy reference is always
there; faster backends (C on the CPU, CUDA, TensorRT) implement the same names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from gguf import GGMLQuantizationType

from kernels import reference
from kernels.dequant import dequantize


class Backend(Protocol):
    name: str

    def weight(self, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> object: ...
    def rmsnorm(self, x, weight, eps: float): ...
    def linear(self, x, weight): ...
    def rope_tables(self, positions: np.ndarray, inv_freq: np.ndarray, scale: float = 1.0): ...
    def rope(self, x, cos, sin, halves: bool = False): ...
    def attention(self, q, k, v, start: int, window: int = 0, softcap: float = 0.0): ...
    def swiglu(self, x, w_gate, w_up, w_down): ...


# The GPU's `sample` kernel's per-row parameters (kernels/cuda/sample.cu's SampleParams); temperature 0 is greedy.
SAMPLE_PARAMS = np.dtype([("temperature", "<f4"), ("top_k", "<i4"), ("top_p", "<f4"), ("seed", "<u4"), ("step", "<u4")])


@runtime_checkable
class Picker(Protocol):
    """A backend that chooses tokens where it computed the head (the CUDA backend's sampling kernel), so that
    only their ids come back, not a vocabulary of logits per row."""

    def pick(self, x, weight, params: np.ndarray, want_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """(x @ weight^T's rows as logits if want_logits, else None; each row's token drawn by params[i])."""
        ...


@dataclass(frozen=True)
class Experts:
    """A stack of expert matrices [n, rows, cols] as a backend holds them, each its own matrix (the C kernels'
    view of its blocks, a GPU copy of them): experts[e] is expert e's, so a token's chosen experts are all that
    is read (models.llama's _experts indexes them)."""

    experts: tuple

    def __getitem__(self, e: int):
        return self.experts[e]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.experts)


def fused_features() -> dict[str, frozenset[str]]:
    """Per backend beside the reference, the block features its fused layer pass runs (README's table)."""
    from kernels import cpu_backend, cuda_backend

    return {"cpu": cpu_backend.FUSED_FEATURES, "cuda": cuda_backend.FUSED_FEATURES}


class NumpyBackend:
    """Float32 NumPy: the obviously-right reference. Dequantizes each weight once, at load, and keeps
    matrices transposed ([in, out]) for `reference.linear`."""

    name = "numpy"

    def weight(self, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
        """A matrix as W^T; a stack of experts' matrices [n, out, in] as [n, in, out], so w[e] is one W^T."""
        w = dequantize(raw, qtype, shape)
        return np.ascontiguousarray(np.swapaxes(w, -1, -2) if w.ndim >= 2 else w, dtype=np.float32)

    rmsnorm = staticmethod(reference.rmsnorm)
    linear = staticmethod(reference.linear)
    rope_tables = staticmethod(reference.rope_tables)
    rope = staticmethod(reference.rope)
    attention = staticmethod(reference.attention)
    swiglu = staticmethod(reference.swiglu)


class OwnMatmulBackend:
    """Base of a backend that brings its own `linear` (the C and CUDA matrix products on quantized
    weights) and takes every other operation from the NumPy reference."""

    def swiglu(self, x, w_gate, w_up, w_down):
        return self.linear(reference.silu(self.linear(x, w_gate)) * self.linear(x, w_up), w_down)

    rmsnorm = staticmethod(reference.rmsnorm)
    rope_tables = staticmethod(reference.rope_tables)
    rope = staticmethod(reference.rope)
    attention = staticmethod(reference.attention)


class UnknownBackendError(ValueError):
    pass


def _cuda_backend() -> Backend:
    """Imported only when asked for: a machine without a GPU never loads pycuda (kernels/cuda_backend.py)."""
    from kernels.cuda_backend import CudaBackend, available

    if not available():
        raise UnknownBackendError("backend 'cuda' needs an NVIDIA GPU and pycuda (pip install -e '.[cuda]')")
    return CudaBackend()


def _cpu_backend(threads: int | None = None) -> Backend:
    """The native C kernels (kernels/cpu_backend.py) on `threads` threads (None: every core); an error
    naming the cause where they are not built."""
    from kernels import native

    if not native.available():
        raise UnknownBackendError(f"backend 'cpu' is unavailable: {native.why_missing()}")
    from kernels.cpu_backend import CpuBackend

    return CpuBackend(threads)


BACKENDS: dict[str, Callable[[], Backend]] = {"numpy": NumpyBackend, "cpu": _cpu_backend, "cuda": _cuda_backend}


def describe(backend: Backend) -> str:
    """The backend's name, with its instruction set and threads where it has them: for --stats and logs."""
    return getattr(backend, "description", backend.name)


def select_backend(name: str = "auto", threads: int | None = None) -> Backend:
    """The named backend, or for "auto" the fastest one this machine can run: CUDA where there is a
    GPU and pycuda, else the native C kernels, else (with one line on stderr saying why) NumPy.
    threads: for the backends that run on CPU threads (cpu); None is every core."""
    if name == "auto":
        from kernels import cuda_backend, native  # cuda_backend: NVML and a package lookup, nothing of CUDA's

        if cuda_backend.available():
            name = "cuda"
        elif native.available():
            name = "cpu"
            if cuda_backend.installed():  # shipped for a GPU (the appliance image) but none to run on
                _say_once(f"backend auto: the C kernels, because {cuda_backend.why_unavailable()}")
        else:
            _say_once(f"backend auto: NumPy, the slow reference, because {native.why_missing()}")
            name = "numpy"
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return _cpu_backend(threads) if name == "cpu" else BACKENDS[name]()


_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)
