"""The Llama decoder, as a stack of layer ranges.

    h = embed(ids) (· sqrt(D))                       # [T, D]
    for each layer:   q, k, v = Wq·n(h) + bq, Wk·n(h) + bk, Wv·n(h) + bv            n = RMSNorm
                      q, k = rope(nq(q)), rope(nk(k))                               nq, nk per head
                      h = h + (na)(Wo · attn(q, k, v))      (over the last `window` keys if declared)
                      h = h + (nf)(W2 · (act(W1·n(h)) * W3·n(h)))  or, with experts (Mixtral, Qwen3-MoE),
                      h = h + sum over the router's top k experts e of p_e · W2e · (silu(W1e·n(h)) * W3e·n(h))
    logits = softcap(Wout · n(h))

The biases (Qwen2), the per-head norms (Qwen3, Gemma 3), the sqrt(D) embedding scale, the output norms
na, nf, GELU for act and the soft caps (Gemma) are there only where the architecture has them
(models/arch.py): one block, its variations as data.

The unit of execution is a layer range [a, b) with its own KV cache per session: the appliance runs
some ranges and LAN workers run others, so a range touches nothing but its own weights and cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels import reference
from kernels.backend import SAMPLE_PARAMS, Backend, Picker, select_backend
from kernels.dequant import dequantize
from models import rope
from models.arch import LAYER_TENSORS, LLAMA, MLP_TENSORS, ArchSpec, check_layout, spec_of
from models.errors import ContextLengthError, UnsupportedModelError
from models.gguf_file import GGUFModelFile, StoredTensor, open_gguf
from models.lora import AdapterRows, LoraAdapter
from models.sampling import Draw


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
    # The file's RoPE schedule (models.rope): one speed per pair of a head; () is the plain theta one.
    rope_inv_freq: tuple[float, ...] = ()
    rope_attn_factor: float = 1.0
    rope_scaling: str = "none"
    arch: str = "llama"  # general.architecture: its ArchSpec says which tensors a layer has
    sliding_window: int = 0  # keys a query sees (its own included); 0: all before it
    n_experts: int = 0  # a mixture of experts in place of the MLP: how many, and how many each token uses
    n_experts_used: int = 0
    experts_norm: bool = True  # the chosen experts' router weights rescaled to sum to 1
    swa_pattern: int = 0  # with a window: every n-th layer global, the rest windowed (Gemma); 0: all windowed
    rope_inv_freq_swa: tuple[float, ...] = ()  # the windowed layers' own RoPE schedule (Gemma 3); (): the same
    query_scale: float = 0.0  # the attention scores' scale; 0: 1/sqrt(E)
    attn_softcap: float = 0.0  # Gemma 2: scores s -> c·tanh(s/c); 0: none
    final_softcap: float = 0.0  # Gemma 2: logits likewise

    @property
    def spec(self) -> ArchSpec:
        return spec_of(self.arch, self.n_experts > 0)

    @property
    def features(self) -> tuple[str, ...]:
        """What this model adds to the plain Llama block: what a fused backend pass must support."""
        extra = {
            "sliding_window": self.sliding_window > 0,
            "swa_pattern": self.sliding_window > 0 and self.swa_pattern > 0,
            "local_rope": bool(self.rope_inv_freq_swa),
            "query_scale": self.query_scale > 0,
            "attn_softcap": self.attn_softcap > 0,
        }
        return (*self.spec.features, *(f for f, on in extra.items() if on))

    def window(self, layer: int) -> int:
        """The keys layer `layer` attends over (0: all): with a pattern, every n-th layer is global."""
        p = self.swa_pattern
        return 0 if p and layer % p == p - 1 else self.sliding_window

    @property
    def inv_freq(self) -> np.ndarray:
        if self.rope_inv_freq:
            return np.array(self.rope_inv_freq)
        return rope.plain_inv_freq(self.rope_theta, self.head_dim)

    def to_json(self) -> str:
        """What an offload worker is sent to build its layer range with (from_json on its side)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        fields_ = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()})

    @classmethod
    def from_file(cls, file: GGUFModelFile) -> LlamaConfig:
        """The config of a model file: its metadata, and Llama 3.1+'s per-pair RoPE factors where it has
        them; a file whose layers are not its architecture's tensors is refused here, at load."""
        if "rope_factors_long.weight" in file.tensors:
            raise UnsupportedModelError("LongRoPE (rope_factors_long.weight, Phi-3 128k) is not supported")
        t = file.tensors.get("rope_freqs.weight")
        config = cls.from_metadata(file.metadata, None if t is None else dequantize(t.raw, t.qtype, t.shape))
        check_layout(config.spec, config.n_layers, file.tensors)
        return config

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], rope_freq_factors: np.ndarray | None = None) -> LlamaConfig:
        arch = meta["general.architecture"]
        n_experts = int(meta.get(f"{arch}.expert_count") or 0)
        spec = spec_of(arch, n_experts > 0)  # an architecture we do not run is refused before any key is read
        if int(meta.get(f"{arch}.expert_gating_func", 1)) != 1:
            raise UnsupportedModelError("expert gating other than softmax is not supported")
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", spec.swa_pattern)
        if not isinstance(pattern, int) or (pattern and not spec.swa_pattern):
            raise UnsupportedModelError("per-layer sliding-window patterns are not supported for " + arch)

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"model metadata lacks {arch}.{key}")
            return value

        dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", dim // n_heads))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        theta = float(get("rope.freq_base", 10000.0))
        sched = rope.schedule(meta, head_dim, theta, rope_freq_factors)
        local_theta = meta.get(f"{arch}.rope.freq_base_swa")  # Gemma 3's local layers: their own base, unscaled
        local = tuple(rope.plain_inv_freq(float(local_theta), head_dim)) if local_theta is not None else ()
        n_layers = int(get("block_count"))
        gemma2 = arch == "gemma2"  # llama.cpp's defaults where a Gemma 2 file leaves them out
        window = int(meta.get(f"{arch}.attention.sliding_window") or (4096 if gemma2 else 0))
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            hidden_dim=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            context_length=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=theta,
            rope_inv_freq=sched.inv_freq,
            rope_attn_factor=sched.attn_factor,
            rope_scaling=sched.kind,
            arch=arch,
            sliding_window=window,
            n_experts=n_experts,
            n_experts_used=int(get("expert_used_count")) if n_experts else 0,
            experts_norm=bool(meta.get(f"{arch}.expert_weights_norm", True)),  # llama.cpp's default for both
            swa_pattern=pattern if window else 0,
            rope_inv_freq_swa=local,
            query_scale=_query_scale(arch, n_layers, dim, n_heads),
            attn_softcap=float(meta.get(f"{arch}.attn_logit_softcapping", 50.0 if gemma2 else 0.0)),
            final_softcap=float(meta.get(f"{arch}.final_logit_softcapping", 30.0 if gemma2 else 0.0)),
        )


# The Gemma 27B models scale queries by 1/sqrt(D/H), not 1/sqrt(E); no key says so: llama.cpp (after
# gemma_pytorch's config) knows them by their layer count, and so do we.
_WIDE_QUERY_SCALE = {("gemma2", 46), ("gemma3", 62)}


def _query_scale(arch: str, n_layers: int, dim: int, n_heads: int) -> float:
    return 1 / np.sqrt(dim / n_heads) if (arch, n_layers) in _WIDE_QUERY_SCALE else 0.0


@dataclass
class LayerWeights:
    attn_norm: Any
    wo: Any
    ffn_norm: Any
    wq: Any = None  # None only where wqkv holds them (Phi-3)
    wk: Any = None
    wv: Any = None
    w_gate: Any = None  # the MLP, or with experts a router [n_experts, D] and each matrix per expert
    w_up: Any = None
    w_down: Any = None
    router: Any = None
    w_gate_exps: Any = None
    w_up_exps: Any = None
    w_down_exps: Any = None
    # Only where the architecture has them (models/arch.py): q/k/v biases, per-head q/k norms.
    bq: Any = None
    bk: Any = None
    bv: Any = None
    q_norm: Any = None
    k_norm: Any = None
    attn_post_norm: Any = None  # Gemma: the attention's and the MLP's outputs normed again
    ffn_post_norm: Any = None
    wqkv: Any = None  # Phi-3: [Wq; Wk; Wv] and [W1; W3] as one matrix each, in place of wq, wk, wv, w_gate, w_up
    w_gate_up: Any = None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in (getattr(self, f.name) for f in fields(self)) if w is not None)


assert {f.name for f in fields(LayerWeights)} == set(LAYER_TENSORS), "a LayerWeights field no architecture reads"


def layer_tensor_names(layer: int, spec: ArchSpec = LLAMA) -> dict[str, str]:
    """Every tensor of a layer of this architecture, by LayerWeights field (7, "wq" -> blk.7.attn_q.weight)."""
    return {name: f"blk.{layer}.{suffix}" for name, suffix in spec.tensors.items()}


def read_layer(spec: ArchSpec, layer: int, weight: Callable[[str], Any]) -> LayerWeights:
    """A layer's weights, each GGUF tensor (by name) prepared by `weight`: the model's and the worker's."""
    return LayerWeights(**{f: weight(name) for f, name in layer_tensor_names(layer, spec).items()})


_HELD: dict[tuple[str, int, tuple[int, ...]], int] = {}


def held_nbytes(backend: Backend, qtype: int, shape: tuple[int, ...]) -> int:
    """The bytes `backend` holds for a stored tensor of this type and shape (the NumPy backend keeps
    float32, ~6x a Q4 file's bytes): found once per kind by preparing a zero tensor of that kind."""
    key = (backend.name, int(qtype), tuple(int(n) for n in shape))
    if key not in _HELD:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        raw = np.zeros(int(np.prod(key[2])) // block * type_size, np.uint8)
        _HELD[key] = backend.weight(raw, GGMLQuantizationType(qtype), key[2]).nbytes
    return _HELD[key]


class KVCache:
    """Keys and values of one session for one layer range: [layer, position, G, E].

    Capacity doubles when full, so appending a token never copies the whole cache.
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, capacity: int = 64, dtype=np.float32
    ):
        self.max_len = max_len
        self.length = 0
        shape = (n_layers, min(capacity, max_len), n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)

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

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative drafts the model did not agree with):
        the next store overwrites them. Nothing is copied."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} positions of a cache holding {self.length}")
        self.length = length

    def fill(self, k: np.ndarray, v: np.ndarray, n: int) -> KVCache:
        """An empty cache takes copies of the first n positions of keys and values [layer, T, G, E] (a prefix
        reused: the prefix cache's entry, a worker's kept session): itself."""
        self.reserve(n)
        self.k[:, :n] = k[:, :n]
        self.v[:, :n] = v[:, :n]
        self.advance(n)
        return self


class RemoteSession(Protocol):
    """A session's state on LAN workers (offload.coordinator.RemoteState): whatever the offload stage keeps."""

    id: str
    length: int  # positions the workers hold for it


@dataclass
class Session:
    """One conversation's state on this device: a KV cache per layer range it runs."""

    caches: dict[tuple[int, int], KVCache] = field(default_factory=dict)
    remote: RemoteSession | None = None  # set by the offload stage when layers run on LAN workers
    adapter: LoraAdapter | None = None  # the LoRA adapter this conversation runs with (models/lora.py)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every local cache (see KVCache.truncate)."""
        for cache in self.caches.values():
            cache.truncate(min(length, cache.length))


# A matmul as the per-operation path calls it: (x, weight, the LayerWeights field) -> x·Wᵀ, plus any
# LoRA delta the batch's adapters add to that matrix.
Linear = Callable[[np.ndarray, Any, str], np.ndarray]


class LayerRange:
    """Layers [start, stop) of a model: their weights, and a forward pass over sessions' caches.

    A backend with `fused_range` (the C and CUDA backends) runs the whole range in one call per step; the
    per-operation formulas below are the NumPy reference's, and any backend's fallback.
    """

    def __init__(self, config: LlamaConfig, backend: Backend, start: int, layers: list[LayerWeights]):
        self.config, self.backend = config, backend
        self.start, self.stop = start, start + len(layers)
        self.layers = layers
        self.windows = [config.window(start + i) for i in range(len(layers))]
        fuse = getattr(backend, "fused_range", None)
        self.fused = fuse(config, layers) if fuse else None

    def new_cache(self) -> KVCache:
        """Float32, or what the fused pass keeps keys and values in (the C backend: float16), or the
        fused pass's own cache where it keeps one (the CUDA backend's: a slot in device memory)."""
        if hasattr(self.fused, "new_cache"):
            return self.fused.new_cache()
        c, dtype = self.config, getattr(self.fused, "kv_dtype", np.float32)
        return KVCache(len(self.layers), c.n_kv_heads, c.head_dim, c.context_length, dtype=dtype)

    def forward(
        self,
        xs: list[np.ndarray],
        caches: list[KVCache],
        adapters: list[LoraAdapter | None] | None = None,
        fused: bool = True,
    ) -> list[np.ndarray]:
        """Run a batch of sequences through every layer of the range, each with its own cache.

        xs[j] holds the hidden states [T_j, D] of the next T_j positions of sequence j (a prompt
        chunk, or one token when decoding). The sequences share every matmul (one pass over the
        weights for the whole batch); only attention is per sequence, over its own cache.
        adapters[j]: sequence j's LoRA adapter or None; each adapter's delta is added to its own rows
        after every base matmul it names (models/lora.py). fused=False: the per-operation path.
        """
        adapters = adapters or [None] * len(xs)
        if self.fused is not None and fused and any(adapters):
            return self._split(xs, caches, adapters)
        c, ops = self.config, self.backend
        H, E = c.n_heads, c.head_dim
        sizes = [x.shape[0] for x in xs]
        starts = [cache.length for cache in caches]
        for cache, n in zip(caches, sizes, strict=True):
            cache.reserve(n)
        bounds = np.cumsum([0, *sizes])
        rows = [slice(bounds[j], bounds[j + 1]) for j in range(len(xs))]
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)])
        cos, sin = ops.rope_tables(positions, c.inv_freq, c.rope_attn_factor)
        x = np.concatenate(xs)
        if self.fused is not None and fused:
            seqs = [(n, s, cache.k, cache.v, cache.capacity) for n, s, cache in zip(sizes, starts, caches, strict=True)]
            x = self.fused.forward(x, cos, sin, seqs)
            for cache, n in zip(caches, sizes, strict=True):
                cache.advance(n)
            return [x[row] for row in rows]
        T, halves = x.shape[0], c.spec.rope_halves
        local = ops.rope_tables(positions, c.rope_inv_freq_swa, c.rope_attn_factor) if c.rope_inv_freq_swa else None
        # A query scale other than 1/sqrt(E) is folded into q, so every backend's attention serves.
        q_mult = c.query_scale * np.sqrt(E) if c.query_scale else 1.0
        lora = AdapterRows.of(adapters, sizes)
        for i, L in enumerate(self.layers):

            def lin(h, w, part, layer=self.start + i):
                return lora.add(ops.linear(h, w), h, layer, part)

            window = self.windows[i]
            rc, rs = local if local is not None and window else (cos, sin)
            h = ops.rmsnorm(x, L.attn_norm, c.norm_eps)
            q, k, v = self._qkv(h, L, lin)
            q = ops.rope(q, rc, rs, halves=halves) * q_mult
            k = ops.rope(k, rc, rs, halves=halves)
            attended = []
            for row, cache, start in zip(rows, caches, starts, strict=True):
                keys, values = cache.store(i, k[row], v[row])
                attended.append(ops.attention(q[row], keys, values, start, window, c.attn_softcap))
            x = x + self._post_norm(lin(np.concatenate(attended).reshape(T, H * E), L.wo, "wo"), L.attn_post_norm)
            h = ops.rmsnorm(x, L.ffn_norm, c.norm_eps)
            tuned = lora.touches(self.start + i, MLP_TENSORS)
            mlp = self._mlp(h, L, lin, tuned) if L.router is None else self._experts(h, L)
            x = x + self._post_norm(mlp, L.ffn_post_norm)
        for cache, n in zip(caches, sizes, strict=True):
            cache.advance(n)
        return [x[row] for row in rows]

    def _qkv(self, h: np.ndarray, L: LayerWeights, lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [T, H, E], k and v [T, G, E]: three projections, or Phi-3's one split in three."""
        c = self.config
        if L.wqkv is None:
            return (
                self._heads(lin(h, L.wq, "wq"), L.bq, L.q_norm, c.n_heads),
                self._heads(lin(h, L.wk, "wk"), L.bk, L.k_norm, c.n_kv_heads),
                self._heads(lin(h, L.wv, "wv"), L.bv, None, c.n_kv_heads),
            )
        q, k, v = np.split(lin(h, L.wqkv, "wqkv"), np.cumsum([c.n_heads, c.n_kv_heads]) * c.head_dim, axis=-1)
        return (
            self._heads(q, None, None, c.n_heads),
            self._heads(k, None, None, c.n_kv_heads),
            self._heads(v, None, None, c.n_kv_heads),
        )

    def _heads(self, y: np.ndarray, bias: Any, norm: Any, n_heads: int) -> np.ndarray:
        """A projection split into heads [T, n_heads, E], plus its bias and each head RMS-normed where
        the architecture has them (Qwen2's biases, Qwen3's and Gemma 3's q/k norms)."""
        c = self.config
        if bias is not None:
            y = y + bias
        y = y.reshape(y.shape[0], n_heads, c.head_dim)
        return y if norm is None else self.backend.rmsnorm(y, norm, c.norm_eps)

    def _mlp(self, h: np.ndarray, L: LayerWeights, lin: Linear, tuned: bool) -> np.ndarray:
        """down(act(W1·h) * W3·h): SiLU (the backend's fused swiglu, unless an adapter adds to one of the
        three), or Gemma's GELU; Phi-3's W1 and W3 are the two halves of one matrix's output."""
        if L.w_gate_up is None and not self.config.spec.gelu and not tuned:
            return self.backend.swiglu(h, L.w_gate, L.w_up, L.w_down)
        if L.w_gate_up is None:
            gate, up = lin(h, L.w_gate, "w_gate"), lin(h, L.w_up, "w_up")
        else:
            gate, up = np.split(lin(h, L.w_gate_up, "w_gate_up"), 2, axis=-1)
        act = reference.gelu_tanh if self.config.spec.gelu else reference.silu
        return lin(act(gate) * up, L.w_down, "w_down")

    def _post_norm(self, y: np.ndarray, norm: Any) -> np.ndarray:
        return y if norm is None else self.backend.rmsnorm(y, norm, self.config.norm_eps)

    def _split(self, xs: list[np.ndarray], caches: list[KVCache], adapters: list) -> list[np.ndarray]:
        """The fused pass cannot add a delta inside its layers: sequences with an adapter run the
        per-operation path together, those without keep the fused pass (their bits never depend on
        whether an adapter shares the batch)."""
        out: list = [None] * len(xs)
        for tuned in (False, True):
            js = [j for j, a in enumerate(adapters) if (a is not None) == tuned]
            if js:
                pick = [adapters[j] for j in js]
                ys = self.forward([xs[j] for j in js], [caches[j] for j in js], pick, fused=not tuned)
                for j, y in zip(js, ys, strict=True):
                    out[j] = y
        return out

    def _experts(self, h: np.ndarray, L: LayerWeights) -> np.ndarray:
        """Each token through the k experts its router scores highest, weighted by the router's softmax
        (renormalised over those k where the file says so). Only the chosen experts' weights are read."""
        ops, k = self.backend, self.config.n_experts_used
        probs = reference.softmax(ops.linear(h, L.router))  # [T, n_experts]
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        weights = np.take_along_axis(probs, chosen, axis=-1)
        if self.config.experts_norm:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for e in np.unique(chosen):
            tokens, slot = np.nonzero(chosen == e)
            y = ops.swiglu(h[tokens], L.w_gate_exps[e], L.w_up_exps[e], L.w_down_exps[e])
            out[tokens] += weights[tokens, slot, None] * y
        return out


class Llama:
    """A Llama-family model: embedding and head on this device, layers prepared range by range."""

    def __init__(self, file: GGUFModelFile, backend: Backend):
        self.file, self.backend = file, backend
        self.config = LlamaConfig.from_file(file)
        self._layers: dict[int, LayerWeights] = {}
        self._ranges: dict[tuple[int, int], LayerRange] = {}
        self.token_embd = self._tensor("token_embd.weight")  # stays quantized: rows are read per token
        self.output_norm = self._weight("output_norm.weight")
        # Tied embeddings: without output.weight the head reuses the embedding matrix.
        head = file.tensors.get("output.weight", self.token_embd)
        self.lm_head = backend.weight(head.raw, head.qtype, head.shape)
        # whether head_pick can choose tokens where the head runs (a Picker backend; no soft-cap to apply)
        self.picks = isinstance(backend, Picker) and not self.config.final_softcap

    @classmethod
    def load(cls, path: str, backend: str = "auto", threads: int | None = None) -> Llama:
        return cls(open_gguf(path), select_backend(backend, threads))

    def _tensor(self, name: str) -> StoredTensor:
        if name not in self.file.tensors:
            raise UnsupportedModelError(f"{self.file.path.name} lacks tensor {name}")
        return self.file.tensors[name]

    def _weight(self, name: str) -> Any:
        t = self._tensor(name)
        return self.backend.weight(t.raw, t.qtype, t.shape)

    def _layer(self, i: int) -> LayerWeights:
        if i not in self._layers:
            self._layers[i] = read_layer(self.config.spec, i, self._weight)
        return self._layers[i]

    def layer_range(self, start: int, stop: int) -> LayerRange:
        if not 0 <= start < stop <= self.config.n_layers:
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {self.config.n_layers})")
        if (start, stop) not in self._ranges:
            layers = [self._layer(i) for i in range(start, stop)]
            self._ranges[(start, stop)] = LayerRange(self.config, self.backend, start, layers)
        return self._ranges[(start, stop)]

    def unload(self) -> None:
        """Drop the prepared layers and hand back the file's mapped pages (Ollama's keep_alive 0): the next
        layer_range prepares them again from the file."""
        self._layers.clear()
        self._ranges.clear()
        self.file.release_pages()

    def layer_nbytes(self, i: int) -> int:
        """What layer i's weights take once this model's backend has prepared them."""
        tensors = self.file.tensors
        return sum(
            held_nbytes(self.backend, tensors[n].qtype, tensors[n].shape)
            for n in layer_tensor_names(i, self.config.spec).values()
        )

    @property
    def fixed_nbytes(self) -> int:
        """What never leaves this device: the (quantized) embedding table, the final norm and the head
        (nothing more for a tied head that a backend reads in place from the embedding's blocks)."""
        head = 0 if getattr(self.lm_head, "raw", None) is self.token_embd.raw else self.lm_head.nbytes
        return self.token_embd.raw.nbytes + self.output_norm.nbytes + head

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Hidden states [T, D] for token ids: dequantizes just the embedding rows asked for."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be non-empty and in [0, {self.config.vocab_size})")
        t = self.token_embd
        x = dequantize(t.raw[ids], t.qtype, (ids.size, t.shape[1]))
        return x * np.float32(np.sqrt(self.config.dim)) if self.config.spec.embed_scale else x

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
        adapters = [s.adapter for s in sessions]
        return r.forward([h.astype(np.float32, copy=False) for h in hiddens], caches, adapters)

    def final_norm(self, hidden: np.ndarray) -> np.ndarray:
        """The last layer's hidden states as the head reads them (after the final RMSNorm)."""
        return self.backend.rmsnorm(hidden, self.output_norm, self.config.norm_eps)

    def head_pick(self, hidden: np.ndarray, draws: list[Draw | None]) -> tuple[np.ndarray | None, list[int | None]]:
        """The head on the last rows, each row with a draw getting its token chosen on the device: (the logits
        when any row has no draw, else None; each row's token, None where it had no draw)."""
        params = np.zeros(len(draws), SAMPLE_PARAMS)  # a row without a draw: greedy, and not read
        for i, d in enumerate(draws):
            if d is not None:
                params[i] = tuple(d)
        want = any(d is None for d in draws)
        logits, tokens = self.backend.pick(self.final_norm(hidden), self.lm_head, params, want)
        return logits, [int(t) if d is not None else None for t, d in zip(tokens, draws, strict=True)]

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] from the last layer's hidden states (soft-capped where the model says: Gemma 2)."""
        logits = self.backend.linear(self.final_norm(hidden), self.lm_head)
        cap = self.config.final_softcap
        return logits if not cap else (cap * np.tanh(logits / cap)).astype(np.float32)
