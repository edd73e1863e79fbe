"""The native CPU kernels (kernels/cpu/*.c, built into kernels._cpu by setup.py) as NumPy calls.

Weights are passed as the file stores them (the memory-mapped blocks of a GGUF tensor); the C side
reads them in place. `available()` says whether the extension imported, and if not, why.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType as Q

try:
    from kernels import _cpu
except ImportError as e:  # not built: the NumPy reference still runs
    _cpu, _missing = None, f"the native CPU kernels are not built ({e}); run `pip install -e .` where gcc is installed"
else:
    _missing = ""
    _cpu.set_threads(os.cpu_count() or 1)

# The formats the C kernels read straight from their blocks.
NATIVE_TYPES = frozenset({Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K})


def available() -> bool:
    return _cpu is not None


def why_missing() -> str:
    return _missing


def isas() -> tuple[str, ...]:
    """Instruction-set variants this CPU runs, best first (the first is in use unless set_isa says otherwise)."""
    return _cpu.isas()


def isa() -> str:
    return _cpu.isa()


def set_isa(name: str) -> None:
    _cpu.set_isa(name)


def threads() -> int:
    return _cpu.threads()


def set_threads(n: int) -> None:
    _cpu.set_threads(n)


def matmul(raw: np.ndarray, qtype: Q, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W^T for W [rows, cols] stored as raw blocks of qtype; x [n, cols] -> [n, rows], float32."""
    rows, cols = shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((*x.shape[:-1], rows), dtype=np.float32)
    _cpu.matmul(raw, int(qtype), rows, cols, x, out)
    return out
