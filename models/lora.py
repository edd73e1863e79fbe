"""LoRA adapters beside the base model: llama.cpp's GGUF adapter files, applied per sequence.

An adapter file (`convert_lora_to_gguf.py` writes one from a PEFT adapter) holds, for each matrix it
changes, `NAME.lora_a` [r, in] and `NAME.lora_b` [out, r], and `adapter.lora.alpha`. The adapted layer
computes x·Wᵀ + (alpha / r)·(x·Aᵀ)·Bᵀ (llama.cpp's scale; PEFT's, without rsLoRA), so the base weights
stay as the file stores them and sequences with different adapters (or none) share one batch: each
adapter's rows get their own low-rank delta after the shared base matmul.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernels.dequant import dequantize
from models.arch import MLP_TENSORS, ArchSpec
from models.errors import ModelError
from models.gguf_file import GGUFModelFile, open_gguf

ADAPTABLE = ("wq", "wk", "wv", "wo", *MLP_TENSORS)  # LayerWeights fields an adapter may change
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no "+": a model name is BASE+ADAPTER
_TENSOR = re.compile(r"blk\.(\d+)\.(.+)\.(lora_a|lora_b)")


class AdapterError(ModelError):
    """An adapter file that cannot be used with the served model, or an unknown adapter name."""


@dataclass(frozen=True)
class LowRank:
    """One matrix's delta: x -> (x·Aᵀ)·(scale·Bᵀ), kept as Aᵀ [in, r] and scale·Bᵀ [r, out] in float32."""

    a_t: np.ndarray
    b_t: np.ndarray

    def delta(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.a_t) @ self.b_t

    @property
    def nbytes(self) -> int:
        return self.a_t.nbytes + self.b_t.nbytes


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """An adapter loaded for one base model: layer -> LayerWeights field -> its delta."""

    name: str
    path: Path
    alpha: float
    rank: int
    layers: dict[int, dict[str, LowRank]]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for parts in self.layers.values() for d in parts.values())

    def describe(self) -> dict:
        parts = sorted({p for layer in self.layers.values() for p in layer})
        return {
            "name": self.name,
            "path": str(self.path),
            "alpha": self.alpha,
            "rank": self.rank,
            "scale": self.alpha / self.rank,
            "layers": sorted(self.layers),
            "parts": parts,
            "bytes": self.nbytes,
        }


def load_adapter(path: str | Path, base: GGUFModelFile, spec: ArchSpec, name: str | None = None) -> LoraAdapter:
    """Read an adapter file and check it against the base model: same architecture, only the layer
    matrices this runs (`ADAPTABLE`), each pair's shapes those of the base matrix; else AdapterError."""
    path = Path(path)
    name = path.stem if name is None else name
    if not NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r}: letters, digits, '.', '_' and '-' only (no '+'), up to 64")
    file = open_gguf(path)
    meta = file.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterError(f"{path.name} is not a LoRA adapter (general.type adapter, adapter.type lora)")
    if meta.get("adapter.alora.invocation_tokens") is not None:
        raise AdapterError(f"{path.name} is an activated LoRA (aLoRA), which is not supported")
    if file.architecture != base.architecture:
        raise AdapterError(f"{path.name} adapts a {file.architecture} model; the served model is {base.architecture}")
    suffixes = {spec.tensors[f].removesuffix(".weight"): f for f in ADAPTABLE if f in spec.tensors}
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for t in file.tensors.values():
        m = _TENSOR.fullmatch(t.name.replace(".weight.lora_", ".lora_"))
        if m is None or m.group(2) not in suffixes:
            raise AdapterError(
                f"{path.name}: tensor {t.name} is not one this runs; adapters may change "
                f"{', '.join(sorted(suffixes))} of a layer"
            )
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = dequantize(t.raw, t.qtype, t.shape)
    if not pairs:
        raise AdapterError(f"{path.name} holds no LoRA tensors")
    alpha = float(meta.get("adapter.lora.alpha") or 0.0)
    layers: dict[int, dict[str, LowRank]] = {}
    ranks = set()
    for (layer, suffix), ab in sorted(pairs.items()):
        target = f"blk.{layer}.{suffix}.weight"
        if set(ab) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{path.name}: {target} has lora_a or lora_b but not both")
        if target not in base.tensors:
            raise AdapterError(f"{path.name}: {target} is not in the served model")
        (out, inp), (a, b) = base.tensors[target].shape, (ab["lora_a"], ab["lora_b"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{path.name}: {target} is [{out}, {inp}]; its lora_a {list(a.shape)} and lora_b "
                f"{list(b.shape)} do not make a low-rank [{out}, {inp}]"
            )
        rank = a.shape[0]
        ranks.add(rank)
        scale = alpha / rank if alpha else 1.0  # llama.cpp: no alpha means scale 1
        delta = LowRank(np.ascontiguousarray(a.T, np.float32), np.ascontiguousarray(scale * b.T, np.float32))
        layers.setdefault(layer, {})[suffixes[suffix]] = delta
    rank = max(ranks)
    return LoraAdapter(name, path, alpha or float(rank), rank, layers)


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for adjacent-pair RoPE (convert_hf_to_gguf.py's `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_adapter(
    path: str | Path,
    arch: str,
    spec: ArchSpec,
    heads: tuple[int, int],
    alpha: float,
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
) -> Path:
    """A GGUF LoRA file as convert_lora_to_gguf.py writes one, from (layer, LayerWeights field) ->
    (A [r, in], B [out, r]) in transformers' layout (q/k rows permuted here as the converter does for
    an adjacent-pair RoPE architecture); heads: (query heads, key/value heads)."""
    from gguf import GGUFWriter

    path = Path(path)
    writer = GGUFWriter(path, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for (layer, part), (a, b) in sorted(pairs.items()):
        if part not in ADAPTABLE or part not in spec.tensors:
            raise AdapterError(f"{part} is not a matrix adapters change in {arch}")
        b = np.asarray(b, np.float32)
        if part in ("wq", "wk") and not spec.rope_halves:
            b = _permute_rows(b, heads[0] if part == "wq" else heads[1])
        name = f"blk.{layer}.{spec.tensors[part]}"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wire_tensors(adapter: LoraAdapter, start: int, stop: int) -> dict[str, np.ndarray]:
    """The adapter's part for layers [start, stop), as the float32 arrays it holds (Aᵀ, scale·Bᵀ): what
    an offload worker is shipped to apply its layers' deltas (`from_wire` on its side)."""
    out = {}
    for layer in range(start, stop):
        for part, d in sorted(adapter.layers.get(layer, {}).items()):
            out[f"blk.{layer}.{part}.lora_a"], out[f"blk.{layer}.{part}.lora_b"] = d.a_t, d.b_t
    return out


def from_wire(name: str, tensors: dict[str, np.ndarray]) -> LoraAdapter:
    """An adapter rebuilt from wire_tensors' arrays (on a worker); AdapterError for a malformed set."""
    layers: dict[int, dict[str, LowRank]] = {}
    for key, a_t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.lora_a", key)
        if m is None:
            continue
        b_t = tensors.get(key.removesuffix("_a") + "_b")
        if m.group(2) not in ADAPTABLE or b_t is None or a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[1] != b_t.shape[0]:
            raise AdapterError(f"adapter tensors for {key} are malformed")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = LowRank(a_t, b_t)
    if 2 * sum(len(p) for p in layers.values()) != len(tensors):
        raise AdapterError("adapter tensors come in lora_a / lora_b pairs")
    rank = max((d.a_t.shape[1] for p in layers.values() for d in p.values()), default=1)
    return LoraAdapter(name, Path(name), float(rank), rank, layers)


@dataclass
class AdapterRows:
    """The rows of a batch each adapter applies to (rows of sequences without one are left alone)."""

    groups: list[tuple[LoraAdapter, np.ndarray]]

    @classmethod
    def of(cls, adapters: list[LoraAdapter | None], sizes: list[int]) -> AdapterRows:
        bounds = np.cumsum([0, *sizes])
        rows: dict[int, tuple[LoraAdapter, list[np.ndarray]]] = {}
        for j, a in enumerate(adapters):
            if a is not None:
                rows.setdefault(id(a), (a, []))[1].append(np.arange(bounds[j], bounds[j + 1]))
        return cls([(a, np.concatenate(r)) for a, r in rows.values()])

    def touches(self, layer: int, parts: tuple[str, ...]) -> bool:
        return any(p in a.layers.get(layer, {}) for a, _ in self.groups for p in parts)

    def add(self, y: np.ndarray, x: np.ndarray, layer: int, part: str) -> np.ndarray:
        """y (= x·Wᵀ for the whole batch) plus each adapter's delta on its own rows."""
        for adapter, rows in self.groups:
            delta = adapter.layers.get(layer, {}).get(part)
            if delta is not None:
                y[rows] += delta.delta(x[rows])
        return y


@dataclass
class Adapters:
    """The adapters a server offers for its base model, by name; loaded and unloaded while it runs. A
    sequence holds its adapter object, so unloading one never changes a request already running."""

    base: GGUFModelFile
    spec: ArchSpec
    _loaded: dict[str, LoraAdapter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, path: str | Path, name: str | None = None) -> LoraAdapter:
        adapter = load_adapter(path, self.base, self.spec, name)
        with self._lock:
            if adapter.name in self._loaded:
                raise AdapterError(f"an adapter named {adapter.name!r} is already loaded; unload it first")
            self._loaded[adapter.name] = adapter
        return adapter

    def unload(self, name: str) -> LoraAdapter:
        with self._lock:
            if name not in self._loaded:
                raise KeyError(name)
            return self._loaded.pop(name)

    def get(self, name: str) -> LoraAdapter | None:
        with self._lock:
            return self._loaded.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def all(self) -> list[LoraAdapter]:
        with self._lock:
            return [self._loaded[n] for n in sorted(self._loaded)]
