"""The GPU backend: the fatbin's kernels launched through pycuda, weights and KV caches in device memory.

Never imported where there is no NVIDIA GPU (kernels.backend checks with NVML first). Two levels:

- `GpuModel`: a whole model on one GPU. Weights are uploaded once (on unified-memory machines,
  Jetson and DGX Spark, the memory-mapped file's pages are registered with the GPU instead:
  cuMemHostRegister, read-only and device-mapped, so there is no second copy in host memory); the
  KV caches of `max_batch` sequence slots live on the device; a decode step (embedding, every layer,
  head and sampling) is captured once per batch width in a CUDA graph and replayed per token, so
  only token ids cross to the host. `forward_hidden` runs hidden states through a layer range: the
  range-level entry that offload workers and issue 10's range interface call.
- `CudaBackend`: today's per-operation Backend protocol (linear and SwiGLU on the GPU, the rest by
  the NumPy formulas), so that `--backend cuda` works with the engine as it stands.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from kernels import reference
from kernels.backend import OwnMatmulBackend
from kernels.dequant import dequantize

FATBIN = Path(__file__).resolve().parent / "cuda" / "appliance_kernels.fatbin"
KERNEL_FORMATS = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0", Q.Q4_K: "q4_k", Q.Q6_K: "q6_k", Q.F16: "f16"}
WIDTHS = (1, 2, 4, 8)  # batch widths the mat-vec kernels are built for; a batch runs at the next one up
MAX_WIDTH = WIDTHS[-1]
Q8_BLOCK_BYTES = 36  # an 8-bit activation block: half2 (d, sum) + 32 x int8
DECODE_SPLITS = 16  # key stretches per head when decoding (flash-decoding)
PREFILL_CHUNK = 512
HEAD_DIMS = (64, 128)
# cuMemHostRegister flags: portable, device-mapped, read-only (the file is mapped read-only).
HOST_REGISTER_FLAGS = 0x01 | 0x02 | 0x08


def gpu_present() -> bool:
    """An NVIDIA GPU, by NVML (a dependency), without touching CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def available() -> bool:
    """cuda can run here: a GPU, pycuda installed, and the fatbin shipped. Imports nothing of CUDA's."""
    return why_unavailable() is None


def installed() -> bool:
    """The GPU backend is installed (pycuda and the fatbin: the cuda extra, as in the appliance image)."""
    return importlib.util.find_spec("pycuda") is not None and FATBIN.exists()


def why_unavailable() -> str | None:
    """Why cuda cannot run here, None when it can; for the line `auto` prints when it falls back."""
    if importlib.util.find_spec("pycuda") is None:
        return "pycuda is not installed (the cuda extra)"
    if not FATBIN.exists():
        return f"the kernels' fatbin {FATBIN.name} is missing"
    if not gpu_present():
        return "no NVIDIA GPU is visible"
    return None


def width_for(batch: int) -> int:
    return next(w for w in WIDTHS if w >= batch)


class CudaGraph:
    """Stream capture through the driver API (pycuda has none): capture once, replay per token."""

    def __init__(self, stream_handle: int):
        self._cu = ctypes.CDLL("libcuda.so.1")
        self._stream = ctypes.c_void_p(stream_handle)
        self._exec = ctypes.c_void_p()

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def __enter__(self) -> CudaGraph:
        self._check(self._cu.cuStreamBeginCapture_v2(self._stream, 1), "cuStreamBeginCapture")  # thread-local mode
        return self

    def __exit__(self, *exc) -> None:
        graph = ctypes.c_void_p()
        self._check(self._cu.cuStreamEndCapture(self._stream, ctypes.byref(graph)), "cuStreamEndCapture")
        if exc[0] is None:
            self._check(
                self._cu.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), graph, ctypes.c_ulonglong(0)),
                "cuGraphInstantiate",
            )

    def replay(self) -> None:
        self._check(self._cu.cuGraphLaunch(self._exec, self._stream), "cuGraphLaunch")


class Device:
    """One GPU: its primary context, the fatbin's module, a stream, and a launcher per kernel."""

    def __init__(self, ordinal: int = 0):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.dev = cuda.Device(ordinal)
        self.ctx = self.dev.retain_primary_context()
        self.ctx.push()
        self.name = self.dev.name()
        self.integrated = bool(self.dev.get_attribute(cuda.device_attribute.INTEGRATED))
        self.sms = self.dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.module = cuda.module_from_buffer(FATBIN.read_bytes())
        self.stream = cuda.Stream()
        self._fns: dict[str, object] = {}
        self._keep: list[object] = []  # allocations and registrations that must live as long as the device
        self._registered: dict[int, tuple[int, int]] = {}  # id(file map) -> (host address, device address)

    def launch(self, name: str, argtypes: str, grid: tuple[int, ...], block: tuple[int, int, int], *args) -> None:
        """argtypes in struct letters: P pointer, i int32, l int64, f float32."""
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self.module.get_function(name)
            fn.prepare(argtypes)
        fn.prepared_async_call(grid, block, self.stream, *args)

    def alloc(self, nbytes: int, zero: bool = True) -> int:
        mem = self.cuda.mem_alloc(max(nbytes, 256))
        if zero:
            self.cuda.memset_d8(mem, 0, max(nbytes, 256))
        self._keep.append(mem)
        return int(mem)

    def upload(self, array: np.ndarray) -> int:
        """Device address of an array's bytes: a copy in device memory, or on an integrated GPU the
        host pages themselves (the file's memory map, registered once), so nothing is copied."""
        array = np.ascontiguousarray(array)
        if self.integrated:
            root = _mapped_root(array)
            if root is not None:
                key = id(root)
                if key not in self._registered:
                    reg = self.cuda.register_host_memory(root, flags=HOST_REGISTER_FLAGS)
                    self._keep.append(reg)
                    self._registered[key] = (root.ctypes.data, int(reg.base.get_device_pointer()))
                host, dev = self._registered[key]
                return dev + (array.ctypes.data - host)
        ptr = self.alloc(array.nbytes, zero=False)
        self.cuda.memcpy_htod(ptr, array)
        return ptr

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, np.ascontiguousarray(array), self.stream)

    def to_host(self, ptr: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.cuda.memcpy_dtoh_async(out, ptr, self.stream)
        self.stream.synchronize()
        return out

    def graph(self) -> CudaGraph:
        return CudaGraph(self.stream.handle)

    # The kernels, one method each (arguments as the .cu entry points take them).

    def rmsnorm_quant(self, x: int, weight: int, rows: int, dim: int, eps: float, y: int = 0, q: int = 0) -> None:
        self.launch("rmsnorm_quant", "PPifPP", (rows, 1), (256, 1, 1), x, weight, dim, eps, y, q)

    def quantize(self, x: int, rows: int, dim: int, q: int) -> None:
        self.launch("quantize_q8_1", "PiP", ((dim // 32 + 7) // 8, rows), (256, 1, 1), x, dim, q)

    def matvec(self, fmt: str, w: int, rows: int, cols: int, act: int, out: int, width: int, ldo: int, acc: bool):
        grid = ((rows + 3) // 4, 1)
        self.launch(f"matvec_{fmt}_b{width}", "PiiPPii", grid, (32, 4, 1), w, rows, cols, act, out, ldo, int(acc))

    def swiglu_vec(self, fmt: str, wg: int, wu: int, rows: int, cols: int, act: int, out_q: int, width: int) -> None:
        self.launch(f"swiglu_{fmt}_b{width}", "PPiiPP", (rows // 32, 1), (32, 8, 1), wg, wu, rows, cols, act, out_q)

    def matmat(self, fmt: str, w: int, rows: int, cols: int, x: int, tokens: int, y: int, ldy: int, acc: bool):
        grid = ((rows + 63) // 64, (tokens + 63) // 64)
        self.launch(f"matmat_{fmt}", "PiiPiPii", grid, (128, 1, 1), w, rows, cols, x, tokens, y, ldy, int(acc))

    def silu_mul(self, g: int, u: int, out: int, n: int) -> None:
        self.launch("silu_mul", "PPPl", ((n + 255) // 256, 1), (256, 1, 1), g, u, out, n)

    def embed(self, fmt: str, table: int, dim: int, ids: int, out: int, tokens: int) -> None:
        self.launch(f"embed_{fmt}", "PiPP", (tokens, 1), (64, 1, 1), table, dim, ids, out)

    def sample(self, logits: int, vocab: int, params: int, tokens_out: int, rows: int) -> None:
        self.launch("sample", "PiPP", (rows, 1), (1024, 1, 1), logits, vocab, params, tokens_out)


SAMPLE_PARAMS = np.dtype([("temperature", "<f4"), ("top_k", "<i4"), ("top_p", "<f4"), ("seed", "<u4"), ("step", "<u4")])


def _mapped_root(array: np.ndarray) -> np.ndarray | None:
    """The np.memmap an array is a view of (the whole model file), if any."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base if isinstance(base, np.ndarray) else None
    return base


@dataclass
class GpuTensor:
    ptr: int
    qtype: Q
    shape: tuple[int, ...]

    @property
    def fmt(self) -> str:
        return KERNEL_FORMATS[self.qtype]


class GpuModel:
    """A Llama model on one GPU (see the module docstring): prefill, graph-replayed decode, ranges."""

    def __init__(self, file, device: Device, max_batch: int = 8, max_context: int = 2048):
        from models.errors import UnsupportedModelError
        from models.llama import LlamaConfig

        self.dev, self.file = device, file
        c = self.config = LlamaConfig.from_file(file)
        if c.features:  # the GPU kernels are the plain Llama block's (models/arch.py)
            raise UnsupportedModelError(f"the GPU kernels do not run {', '.join(c.features)} ({c.arch})")
        if c.head_dim not in HEAD_DIMS or c.n_heads // c.n_kv_heads > 8 or c.dim % 32 or c.hidden_dim % 32:
            raise UnsupportedModelError(f"the GPU kernels do not support this model's shapes ({c})")
        self.max_batch, self.max_context = max_batch, min(max_context, c.context_length)
        self.slots = max_batch + 1  # the last slot takes the padding rows of a batch narrower than its width

        def tensor(name: str) -> GpuTensor:
            t = file.tensors[name]
            if len(t.shape) == 1:  # norms: float32 vectors
                return GpuTensor(device.upload(dequantize(t.raw, t.qtype, t.shape).astype(np.float32)), Q.F32, t.shape)
            if t.qtype not in KERNEL_FORMATS:
                raise UnsupportedModelError(f"{name} is {t.qtype.name}: the GPU kernels take {sorted(KERNEL_FORMATS)}")
            return GpuTensor(device.upload(t.raw), t.qtype, t.shape)

        parts = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        self.layers = [{p: tensor(f"blk.{i}.{p}.weight") for p in parts} for i in range(c.n_layers)]
        self.embedding = tensor("token_embd.weight")
        self.output_norm = tensor("output_norm.weight")
        self.head = tensor("output.weight") if "output.weight" in file.tensors else self.embedding
        self._allocate()
        self._graphs: dict[int, CudaGraph] = {}

    def _allocate(self) -> None:
        c, d, T = self.config, self.dev, max(PREFILL_CHUNK, 8)
        H, G, E, D, F = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim
        self.qkv_width = (H + 2 * G) * E
        self.layer_stride = self.max_context * G * E
        self.slot_stride = c.n_layers * self.layer_stride
        cache_bytes = self.slots * self.slot_stride * 2
        self.k_cache, self.v_cache = d.alloc(cache_bytes), d.alloc(cache_bytes)
        f4 = 4
        self.x = d.alloc(T * D * f4)
        self.y = d.alloc(T * max(D, F) * f4)
        self.qkv = d.alloc(T * self.qkv_width * f4)
        self.q = d.alloc(T * H * E * f4)
        self.attn = d.alloc(T * H * E * f4)
        self.gate, self.up = d.alloc(T * F * f4), d.alloc(T * F * f4)
        self.act_q = d.alloc(T * max(D, H * E, F) // 32 * Q8_BLOCK_BYTES)
        self.hid_q = d.alloc(T * F // 32 * Q8_BLOCK_BYTES)
        splits = max(DECODE_SPLITS, 2)
        self.part_ml = d.alloc(T * H * splits * 2 * f4)
        self.part_acc = d.alloc(T * H * splits * E * f4)
        self.logits = d.alloc(8 * c.vocab_size * f4)
        self.ids, self.positions, self.slot_ids = d.alloc(T * 4), d.alloc(T * 4), d.alloc(T * 4)
        self.params = d.alloc(8 * SAMPLE_PARAMS.itemsize)
        self.inv_freq = d.upload(c.inv_freq.astype(np.float64))  # the file's RoPE schedule (models/rope.py)
        self.tokens = d.alloc(8 * 4)

    # -- the layers --------------------------------------------------------------------------------------

    def _attention(self, layer: int, rows: int, splits: int) -> None:
        c, d = self.config, self.dev
        H, G, E = c.n_heads, c.n_kv_heads, c.head_dim
        d.launch(
            "rope_store", "PPPiiiPfPPPlli", (rows, 1), (128, 1, 1),
            self.qkv, self.positions, self.slot_ids, H, G, E, self.inv_freq, c.rope_attn_factor, self.q,
            self.k_cache, self.v_cache, self.slot_stride, self.layer_stride, layer,
        )  # fmt: skip
        d.launch(
            f"attend_split_e{E}", "PPPPPiilliiPP", (G, splits, rows), (128, 1, 1),
            self.q, self.k_cache, self.v_cache, self.positions, self.slot_ids, H, G,
            self.slot_stride, self.layer_stride, layer, splits, self.part_ml, self.part_acc,
        )  # fmt: skip
        d.launch("attend_combine", "PPiiiP", (H, rows), (E, 1, 1), self.part_ml, self.part_acc, H, E, splits, self.attn)

    def _layers_decode(self, start: int, stop: int, width: int) -> None:
        """Layers over `width` rows of x, one token each: mat-vec on 8-bit activations."""
        c, d = self.config, self.dev
        H, G, E, D, F = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim
        for i in range(start, stop):
            L = self.layers[i]
            d.rmsnorm_quant(self.x, L["attn_norm"].ptr, width, D, c.norm_eps, 0, self.act_q)
            offset = 0
            for part, rows in (("attn_q", H * E), ("attn_k", G * E), ("attn_v", G * E)):
                w = L[part]
                d.matvec(w.fmt, w.ptr, rows, D, self.act_q, self.qkv + 4 * offset, width, self.qkv_width, False)
                offset += rows
            self._attention(i, width, DECODE_SPLITS)
            d.quantize(self.attn, width, H * E, self.act_q)
            w = L["attn_output"]
            d.matvec(w.fmt, w.ptr, D, H * E, self.act_q, self.x, width, D, True)
            d.rmsnorm_quant(self.x, L["ffn_norm"].ptr, width, D, c.norm_eps, 0, self.act_q)
            g, u = L["ffn_gate"], L["ffn_up"]
            if g.qtype == u.qtype:
                d.swiglu_vec(g.fmt, g.ptr, u.ptr, F, D, self.act_q, self.hid_q, width)
            else:  # gate and up in different formats: two products, then SwiGLU
                d.matvec(g.fmt, g.ptr, F, D, self.act_q, self.gate, width, F, False)
                d.matvec(u.fmt, u.ptr, F, D, self.act_q, self.up, width, F, False)
                d.silu_mul(self.gate, self.up, self.gate, width * F)
                d.quantize(self.gate, width, F, self.hid_q)
            w = L["ffn_down"]
            d.matvec(w.fmt, w.ptr, D, F, self.hid_q, self.x, width, D, True)

    def _layers_prefill(self, start: int, stop: int, rows: int) -> None:
        """Layers over `rows` tokens of x: mat-mat on the tensor cores."""
        c, d = self.config, self.dev
        H, G, E, D, F = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim
        for i in range(start, stop):
            L = self.layers[i]
            d.rmsnorm_quant(self.x, L["attn_norm"].ptr, rows, D, c.norm_eps, self.y, 0)
            offset = 0
            for part, n in (("attn_q", H * E), ("attn_k", G * E), ("attn_v", G * E)):
                w = L[part]
                d.matmat(w.fmt, w.ptr, n, D, self.y, rows, self.qkv + 4 * offset, self.qkv_width, False)
                offset += n
            self._attention(i, rows, 2)
            w = L["attn_output"]
            d.matmat(w.fmt, w.ptr, D, H * E, self.attn, rows, self.x, D, True)
            d.rmsnorm_quant(self.x, L["ffn_norm"].ptr, rows, D, c.norm_eps, self.y, 0)
            g, u, w = L["ffn_gate"], L["ffn_up"], L["ffn_down"]
            d.matmat(g.fmt, g.ptr, F, D, self.y, rows, self.gate, F, False)
            d.matmat(u.fmt, u.ptr, F, D, self.y, rows, self.up, F, False)
            d.silu_mul(self.gate, self.up, self.gate, rows * F)
            d.matmat(w.fmt, w.ptr, D, F, self.gate, rows, self.x, D, True)

    def _head_and_sample(self, rows: int, first_row: int = 0) -> None:
        """Final norm, LM head and sampling for rows [first_row, first_row + rows) of x."""
        c, d, h = self.config, self.dev, self.head
        d.rmsnorm_quant(self.x + 4 * first_row * c.dim, self.output_norm.ptr, rows, c.dim, c.norm_eps, 0, self.act_q)
        d.matvec(h.fmt, h.ptr, c.vocab_size, c.dim, self.act_q, self.logits, rows, c.vocab_size, False)
        d.sample(self.logits, c.vocab_size, self.params, self.tokens, rows)

    # -- what callers use ----------------------------------------------------------------------------------

    def _set_rows(self, ids, positions, slots) -> None:
        d = self.dev
        d.to_device(self.ids, np.asarray(ids, np.int32))
        d.to_device(self.positions, np.asarray(positions, np.int32))
        d.to_device(self.slot_ids, np.asarray(slots, np.int32))

    def _set_params(self, params: np.ndarray) -> None:
        self.dev.to_device(self.params, params)

    @staticmethod
    def sampling(rows: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0) -> np.ndarray:
        p = np.zeros(rows, SAMPLE_PARAMS)
        p["temperature"], p["top_k"], p["top_p"], p["seed"], p["step"] = temperature, top_k, top_p, seed, step
        return p

    def prefill(self, ids: list[int], slot: int, start: int = 0, params: np.ndarray | None = None) -> int:
        """Run a prompt (chunks of PREFILL_CHUNK) into a slot's cache from position `start`; the next token."""
        d, c = self.dev, self.config
        if start + len(ids) > self.max_context:
            raise ValueError(f"{start + len(ids)} tokens exceed the GPU context of {self.max_context}")
        for b in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[b : b + PREFILL_CHUNK]
            n = len(chunk)
            self._set_rows(chunk, np.arange(start + b, start + b + n), [slot] * n)
            d.embed(self.embedding.fmt, self.embedding.ptr, c.dim, self.ids, self.x, n)
            self._layers_prefill(0, c.n_layers, n)
        self._set_params(params if params is not None else self.sampling(1))
        self._head_and_sample(1, first_row=n - 1)
        return int(d.to_host(self.tokens, (1,), np.int32)[0])

    def decode(self, ids: list[int], positions: list[int], slots: list[int], params: np.ndarray | None = None):
        """One token for each of up to max_batch sequences: a replay of the step's CUDA graph."""
        rows = len(ids)
        width = width_for(rows)
        pad = width - rows
        self._set_rows(list(ids) + [0] * pad, list(positions) + [0] * pad, list(slots) + [self.slots - 1] * pad)
        p = params if params is not None else self.sampling(rows)
        self._set_params(np.concatenate([p, self.sampling(pad)]) if pad else p)
        if width not in self._graphs:
            graph = self.dev.graph()
            with graph:
                self._decode_step(width)
            self._graphs[width] = graph
        self._graphs[width].replay()
        return self.dev.to_host(self.tokens, (width,), np.int32)[:rows].tolist()

    def _decode_step(self, width: int) -> None:
        c, d = self.config, self.dev
        d.embed(self.embedding.fmt, self.embedding.ptr, c.dim, self.ids, self.x, width)
        self._layers_decode(0, c.n_layers, width)
        self._head_and_sample(width)

    def forward_hidden(self, layers: tuple[int, int], hidden: np.ndarray, slot: int, start: int) -> np.ndarray:
        """Hidden states [T, D] through layers [a, b), using and extending a slot's cache from `start`."""
        n = hidden.shape[0]
        self._set_rows(np.zeros(n), np.arange(start, start + n), [slot] * n)
        self.dev.to_device(self.x, hidden.astype(np.float32))
        self._layers_prefill(*layers, n)
        return self.dev.to_host(self.x, hidden.shape)

    def generate_greedy(self, ids: list[int], n_new: int, slot: int = 0) -> list[int]:
        out = [self.prefill(ids, slot)]
        for i in range(n_new - 1):
            out += self.decode([out[-1]], [len(ids) + i], [slot])
        return out


class CudaBackend(OwnMatmulBackend):
    """The per-operation Backend protocol on the GPU (linear and SwiGLU there, the rest by the NumPy
    formulas): `--backend cuda` with today's engine. GpuModel is the fast path."""

    name = "cuda"

    def __init__(self):
        self.dev = Device()
        self._scratch: dict[str, tuple[int, int]] = {}

    def _buffer(self, key: str, nbytes: int) -> int:
        ptr, size = self._scratch.get(key, (0, 0))
        if size < nbytes:
            ptr, size = self.dev.alloc(nbytes, zero=False), nbytes
            self._scratch[key] = (ptr, size)
        return ptr

    def weight(self, raw: np.ndarray, qtype: Q, shape: tuple[int, ...]):
        if len(shape) == 1 or qtype not in KERNEL_FORMATS:
            w = dequantize(raw, qtype, shape)
            return np.ascontiguousarray(w.T if w.ndim == 2 else w, dtype=np.float32)  # the NumPy reference's form
        return GpuTensor(self.dev.upload(raw), qtype, shape)

    def _linear_dev(self, x: np.ndarray, w: GpuTensor, out_key: str) -> int:
        T, K = x.shape
        N = w.shape[0]
        xd = self._buffer("x", x.nbytes)
        self.dev.to_device(xd, x.astype(np.float32))
        y = self._buffer(out_key, max(T, width_for(min(T, MAX_WIDTH))) * N * 4)  # mat-vec writes `width` rows
        if T <= MAX_WIDTH:
            q = self._buffer("q", width_for(T) * K // 32 * Q8_BLOCK_BYTES)
            self.dev.quantize(xd, T, K, q)
            self.dev.matvec(w.fmt, w.ptr, N, K, q, y, width_for(T), N, False)
        else:
            self.dev.matmat(w.fmt, w.ptr, N, K, xd, T, y, N, False)
        return y

    def linear(self, x, w):
        if isinstance(w, np.ndarray):
            return reference.linear(x, w)
        y = self._linear_dev(x, w, "y")
        return self.dev.to_host(y, (x.shape[0], w.shape[0]))
