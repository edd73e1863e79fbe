"""`--backend cpu`: the native C kernels (kernels/native.py) behind the Backend protocol.

Weights stay as the file stores them (NativeWeight wraps the memory-mapped blocks), and a layer
range runs as one fused C call per step (`fused_range`); the remaining per-operation methods are
the NumPy reference's, for the head's norm and for formats the kernels do not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

from kernels import native, reference
from kernels.backend import Experts, OwnMatmulBackend
from kernels.dequant import dequantize


@dataclass(frozen=True)
class NativeWeight:
    """A matrix [rows, cols] left in its blocks; the C kernels read it in place."""

    raw: np.ndarray
    qtype: Q
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


# What the fused C pass (kernels/cpu/layer.c) runs beyond the plain Llama block (models/arch.py's features);
# a model needing more runs on the per-operation path: the C matmul, the reference's other formulas.
FUSED_FEATURES = frozenset({"qkv_bias", "qk_norm", "rope_halves", "sliding_window"})


class CpuBackend(OwnMatmulBackend):
    name = "cpu"

    def __init__(self, threads: int | None = None):
        if not native.available():
            raise RuntimeError(native.why_missing())
        if threads:
            native.set_threads(threads)

    @property
    def description(self) -> str:
        return f"cpu ({native.isa()}, {native.threads()} threads)"

    def weight(self, raw: np.ndarray, qtype: Q, shape: tuple[int, ...]):
        native_blocks = qtype in native.NATIVE_TYPES and shape[-1] % native.block_size(qtype) == 0
        if len(shape) == 2 and native_blocks:
            return NativeWeight(raw, qtype, (int(shape[0]), int(shape[1])))
        if len(shape) == 3 and native_blocks:
            rows = (int(shape[1]), int(shape[2]))
            return Experts(tuple(NativeWeight(e, qtype, rows) for e in raw.reshape(shape[0], -1)))
        w = dequantize(raw, qtype, shape)  # norms, and formats without a kernel: the reference's form
        return np.ascontiguousarray(np.swapaxes(w, -1, -2) if w.ndim >= 2 else w, dtype=np.float32)

    def linear(self, x, w):
        if isinstance(w, NativeWeight):
            return native.matmul(w.raw, w.qtype, w.shape, x)
        return reference.linear(x, w)

    def fused_range(self, config, layers: list) -> native.NativeRange | None:
        """The layers as one C pass, or None when a weight is not in a form the kernels read or the
        architecture needs what the pass does not do (then LayerRange runs the per-operation path)."""
        if not set(config.features) <= FUSED_FEATURES:
            return None
        parts = []
        for L in layers:
            norms = [L.attn_norm, L.ffn_norm]
            mats = [L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down]
            if not all(isinstance(m, NativeWeight) for m in mats):
                return None
            vectors = [getattr(L, name) for name in native.OPTIONAL_PARTS]
            parts.append([(n, Q.F32, n.shape) for n in norms] + [(m.raw, m.qtype, m.shape) for m in mats] + vectors)
        c = config
        dims = (
            c.dim,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.hidden_dim,
            c.norm_eps,
            c.spec.rope_halves,
            c.sliding_window,
        )
        return native.NativeRange(dims, parts)
