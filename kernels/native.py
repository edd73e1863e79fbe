"""The native CPU kernels (kernels/cpu/*.c, built into kernels._cpu by setup.py) as NumPy calls.

Weights are passed as the file stores them (the memory-mapped blocks of a GGUF tensor); the C side
reads them in place. `available()` says whether the extension imported, and if not, why.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kernels.dequant import dequantize

try:
    from kernels import _cpu
except ImportError as e:  # not built: the NumPy reference still runs
    _cpu, _missing = None, f"the native CPU kernels are not built ({e}); run `pip install -e .` where gcc is installed"
else:
    _missing = ""
    _cpu.set_threads(os.cpu_count() or 1)

# What the C kernels keep keys and values in (kv_t in kernels/cpu/cpu.h).
KV_DTYPE = np.float16

# The formats the C kernels read straight from their blocks (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K and the IQ4s
# through the portable C in every variant: kernels/cpu/generic.c).
NATIVE_TYPES = frozenset(
    {Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS}
)


def block_size(qtype: Q) -> int:
    """Values per block of a format: a matrix's row length must be a multiple of it."""
    return GGML_QUANT_SIZES[qtype][0]


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


# The q8 activation block: scale d, d * sum of the int8s, 32 int8s.
Q8_BLOCK = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])


def quantize(x: np.ndarray) -> np.ndarray:
    """x (float32, length a multiple of 32) as the kernels' q8 activation blocks (for tests)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.size // 32, Q8_BLOCK)
    _cpu.quantize(x, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """The fused pass's attention step alone (for tests): q [T, H, E] over k, v [start + T, G, E],
    which are rounded to float16 first, as the KV cache holds them."""
    T, H, E = q.shape
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    f16 = [np.ascontiguousarray(a, dtype=KV_DTYPE) for a in (k, v)]
    _cpu.attention(q, f16[0], f16[1], H, k.shape[1], E, start, out)
    return out


# The order prepare_range takes a layer's tensors in: norms, matrices, then the vectors only some
# architectures have (None where absent).
LAYER_PARTS = ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
OPTIONAL_PARTS = ("bq", "bk", "bv", "q_norm", "k_norm")


class NativeRange:
    """A layer range prepared for the fused C forward pass: its weights read in place from the file.

    dims: (D, H, G, E, F, eps, rope_halves, window). layers: per layer, LAYER_PARTS as (raw blocks,
    type, logical shape), then OPTIONAL_PARTS as float32 vectors or None. Holds every array the C side
    points into, so they live as long as it does.
    """

    kv_dtype = KV_DTYPE

    def __init__(self, dims: tuple[int, int, int, int, int, float, int, int], layers: list[tuple]):
        self._keep = []
        spec = []
        n = len(LAYER_PARTS)
        for parts in layers:
            norms = [
                np.ascontiguousarray(dequantize(raw, qtype, shape), dtype=np.float32) for raw, qtype, shape in parts[:2]
            ]
            weights = [(raw, int(qtype), shape[0]) for raw, qtype, shape in parts[2:n]]
            vectors = [None if v is None else np.ascontiguousarray(v, dtype=np.float32) for v in parts[n:]]
            self._keep.append((norms, [w[0] for w in weights], vectors))
            spec.append((*norms, *weights, *vectors))
        self._handle = _cpu.prepare_range(dims, spec)

    def forward(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, seqs: list[tuple]) -> np.ndarray:
        """x [T, D] through the range; seqs: per sequence (rows, start, k cache, v cache, capacity) in row order."""
        x = np.array(x, dtype=np.float32, order="C")
        _cpu.range_forward(self._handle, x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), seqs)
        return x
