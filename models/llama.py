"""The Llama decoder, as a stack of layer ranges.

    h = embed(ids)                                   # [T, D]
    for each layer:   h = h + Wo · attn(rope(Wq·n(h)), rope(Wk·n(h)), Wv·n(h))    n = RMSNorm
                      h = h + W2 · (silu(W1·n(h)) * W3·n(h))
    logits = Wout · n(h)

The unit of execution is a layer range [a, b) with its own KV cache per session: the appliance runs
some ranges and LAN workers run others, so a range touches nothing but its own weights and cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.backend import Backend, select_backend
from kernels.dequant import dequantize
from models.errors import ContextLengthError, UnsupportedModelError
from models.gguf_file import GGUFModelFile, StoredTensor, open_gguf


@dataclass(frozen=True)
class LlamaConfig:
    dim: int  # D, model width
    n_layers: int
    n_heads: int  # H, query heads
    n_kv_heads: int  # G, key/value heads (grouped-query attention)
    head_dim: int  # E
    hidden_dim: int  # MLP width
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> LlamaConfig:
        arch = meta["general.architecture"]

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"model metadata lacks {arch}.{key}")
            return value

        dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", dim // n_heads))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        return cls(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            hidden_dim=int(get("feed_forward_length")),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            context_length=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
        )


@dataclass
class LayerWeights:
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any


class KVCache:
    """Keys and values of one session for one layer range: [layer, position, G, E].

    Capacity doubles when full, so appending a token never copies the whole cache.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, capacity: int = 64):
        self.max_len = max_len
        self.length = 0
        shape = (n_layers, min(capacity, max_len), n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n_new: int) -> None:
        need = self.length + n_new
        if need > self.max_len:
            raise ContextLengthError(f"{need} tokens do not fit the context window of {self.max_len} tokens")
        if need > self.capacity:
            new_cap = min(max(2 * self.capacity, need), self.max_len)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = np.zeros((old.shape[0], new_cap, *old.shape[2:]), dtype=old.dtype)
                grown[:, : self.length] = old[:, : self.length]
                setattr(self, name, grown)

    def store(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the new positions of one layer; return that layer's keys and values so far."""
        end = self.length + k.shape[0]
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n_new: int) -> None:
        self.length += n_new


@dataclass
class Session:
    """One conversation's state on this device: a KV cache per layer range it runs."""

    caches: dict[tuple[int, int], KVCache] = field(default_factory=dict)
    remote: Any = None  # its state on LAN workers, when layers are offloaded (offload.coordinator)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())


class LayerRange:
    """Layers [start, stop) of a model: their weights, and a forward pass over sessions' caches."""

    def __init__(self, config: LlamaConfig, backend: Backend, start: int, layers: list[LayerWeights]):
        self.config, self.backend = config, backend
        self.start, self.stop = start, start + len(layers)
        self.layers = layers

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(len(self.layers), c.n_kv_heads, c.head_dim, c.context_length)

    def forward(self, xs: list[np.ndarray], caches: list[KVCache]) -> list[np.ndarray]:
        """Run a batch of sequences through every layer of the range, each with its own cache.

        xs[j] holds the hidden states [T_j, D] of the next T_j positions of sequence j (a prompt
        chunk, or one token when decoding). The sequences share every matmul (one pass over the
        weights for the whole batch); only attention is per sequence, over its own cache.
        """
        c, B = self.config, self.backend
        H, G, E = c.n_heads, c.n_kv_heads, c.head_dim
        sizes = [x.shape[0] for x in xs]
        starts = [cache.length for cache in caches]
        for cache, n in zip(caches, sizes, strict=True):
            cache.reserve(n)
        bounds = np.cumsum([0, *sizes])
        rows = [slice(bounds[j], bounds[j + 1]) for j in range(len(xs))]
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)])
        cos, sin = B.rope_tables(positions, E, c.rope_theta)
        x = np.concatenate(xs)
        T = x.shape[0]
        for i, L in enumerate(self.layers):
            h = B.rmsnorm(x, L.attn_norm, c.norm_eps)
            q = B.rope(B.linear(h, L.wq).reshape(T, H, E), cos, sin)
            k = B.rope(B.linear(h, L.wk).reshape(T, G, E), cos, sin)
            v = B.linear(h, L.wv).reshape(T, G, E)
            attended = []
            for row, cache, start in zip(rows, caches, starts, strict=True):
                keys, values = cache.store(i, k[row], v[row])
                attended.append(B.attention(q[row], keys, values, start))
            x = x + B.linear(np.concatenate(attended).reshape(T, H * E), L.wo)
            x = x + B.swiglu(B.rmsnorm(x, L.ffn_norm, c.norm_eps), L.w_gate, L.w_up, L.w_down)
        for cache, n in zip(caches, sizes, strict=True):
            cache.advance(n)
        return [x[row] for row in rows]


class Llama:
    """A Llama-family model: embedding and head on this device, layers prepared range by range."""

    def __init__(self, file: GGUFModelFile, backend: Backend):
        self.file, self.backend = file, backend
        self.config = LlamaConfig.from_metadata(file.metadata)
        self._layers: dict[int, LayerWeights] = {}
        self._ranges: dict[tuple[int, int], LayerRange] = {}
        self.token_embd = self._tensor("token_embd.weight")  # stays quantized: rows are read per token
        self.output_norm = self._weight("output_norm.weight")
        # Tied embeddings: without output.weight the head reuses the embedding matrix.
        head = file.tensors.get("output.weight", self.token_embd)
        self.lm_head = backend.weight(head.raw, head.qtype, head.shape)

    @classmethod
    def load(cls, path: str, backend: str = "auto") -> Llama:
        return cls(open_gguf(path), select_backend(backend))

    def _tensor(self, name: str) -> StoredTensor:
        if name not in self.file.tensors:
            raise UnsupportedModelError(f"{self.file.path.name} lacks tensor {name}")
        return self.file.tensors[name]

    def _weight(self, name: str) -> Any:
        t = self._tensor(name)
        return self.backend.weight(t.raw, t.qtype, t.shape)

    def _layer(self, i: int) -> LayerWeights:
        if i not in self._layers:
            w = lambda part: self._weight(f"blk.{i}.{part}.weight")  # noqa: E731
            self._layers[i] = LayerWeights(
                attn_norm=w("attn_norm"),
                wq=w("attn_q"),
                wk=w("attn_k"),
                wv=w("attn_v"),
                wo=w("attn_output"),
                ffn_norm=w("ffn_norm"),
                w_gate=w("ffn_gate"),
                w_up=w("ffn_up"),
                w_down=w("ffn_down"),
            )
        return self._layers[i]

    def layer_range(self, start: int, stop: int) -> LayerRange:
        if not 0 <= start < stop <= self.config.n_layers:
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {self.config.n_layers})")
        if (start, stop) not in self._ranges:
            layers = [self._layer(i) for i in range(start, stop)]
            self._ranges[(start, stop)] = LayerRange(self.config, self.backend, start, layers)
        return self._ranges[(start, stop)]

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Hidden states [T, D] for token ids: dequantizes just the embedding rows asked for."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be non-empty and in [0, {self.config.vocab_size})")
        t = self.token_embd
        return dequantize(t.raw[ids], t.qtype, (ids.size, t.shape[1]))

    def run_layers(self, layers: tuple[int, int], hidden: np.ndarray, session: Session) -> np.ndarray:
        """Run hidden states through layers [a, b) using (and extending) the session's cache for them."""
        return self.run_layers_batch(layers, [hidden], [session])[0]

    def run_layers_batch(
        self, layers: tuple[int, int], hiddens: list[np.ndarray], sessions: list[Session]
    ) -> list[np.ndarray]:
        """run_layers for several sessions at once, sharing each weight pass (continuous batching)."""
        r = self.layer_range(*layers)
        for hidden in hiddens:
            if hidden.ndim != 2 or hidden.shape[1] != self.config.dim or hidden.shape[0] == 0:
                raise ValueError(f"hidden states must be [T, {self.config.dim}], got {list(hidden.shape)}")
        caches = [s.caches.get(layers) or s.caches.setdefault(layers, r.new_cache()) for s in sessions]
        return r.forward([h.astype(np.float32, copy=False) for h in hiddens], caches)

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] from the last layer's hidden states."""
        B = self.backend
        return B.linear(B.rmsnorm(hidden, self.output_norm, self.config.norm_eps), self.lm_head)
