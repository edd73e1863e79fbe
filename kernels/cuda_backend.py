"""The GPU backend: the fatbin's kernels launched through pycuda, weights and KV caches in device memory.

Never imported where there is no NVIDIA GPU (kernels.backend checks with NVML first). A range-level
backend like the C one: `CudaBackend.fused_range` gives models.llama.LayerRange a `CudaRange`, so
the engine, the scheduler and offload workers use it exactly as they use `--backend cpu`. Weights
are uploaded once (on unified-memory machines, Jetson and DGX Spark, the memory-mapped file's pages
are registered with the GPU instead: cuMemHostRegister, read-only and device-mapped, so there is no
second copy in host memory); each session's KV cache is a slot in device memory (`DeviceKVCache`);
a range's decode step (every layer, at a batch width of 1/2/4/8) is captured once per width in a
CUDA graph and replayed per token, so only hidden states cross to the host.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from kernels import reference
from kernels.backend import SAMPLE_PARAMS, Experts, OwnMatmulBackend
from kernels.dequant import dequantize

FATBIN = Path(__file__).resolve().parent / "cuda" / "appliance_kernels.fatbin"
KERNEL_FORMATS = {  # every format the NumPy reference reads but F32 (dequantized there: norms, small tensors)
    Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1", Q.Q8_0: "q8_0", Q.IQ4_NL: "iq4_nl",
    Q.Q2_K: "q2_k", Q.Q3_K: "q3_k", Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k", Q.IQ4_XS: "iq4_xs",
    Q.F16: "f16", Q.BF16: "bf16",
}  # fmt: skip
WIDTHS = (1, 2, 4, 8)  # batch widths the mat-vec kernels are built for; a batch runs at the next one up
MAX_WIDTH = WIDTHS[-1]
Q8_BLOCK_BYTES = 36  # an 8-bit activation block: half2 (d, sum) + 32 x int8
DECODE_SPLITS = 16  # key stretches per head when decoding (flash-decoding)
PREFILL_SPLITS = 2  # ... and for a prompt's rows, which are many already
PREFILL_CHUNK = 512
HEAD_DIMS = (64, 128)
FUSED_FEATURES: frozenset[str] = frozenset()  # a CudaRange runs plain llama blocks; the rest go per operation
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
        # One caller at a time: ranges and the head share the stream and their scratch buffers, and an
        # offload worker runs each session's stream in its own thread.
        self.lock = threading.RLock()
        self._fns: dict[str, object] = {}
        self._keep: list[object] = []  # registrations that must live as long as the device
        self._owned: dict[int, object] = {}  # allocations by address
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
        self._owned[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self.stream.synchronize()  # nothing queued may still read or write it
        self._owned.pop(ptr).free()

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device to device, in stream order."""
        self.cuda.memcpy_dtod_async(dst, src, nbytes, self.stream)

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
    nbytes: int

    @property
    def fmt(self) -> str:
        return KERNEL_FORMATS[self.qtype]


def sample_params(rows: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0) -> np.ndarray:
    """The `sample` kernel's per-row parameters (temperature 0: greedy)."""
    p = np.zeros(rows, SAMPLE_PARAMS)
    p["temperature"], p["top_k"], p["top_p"], p["seed"], p["step"] = temperature, top_k, top_p, seed, step
    return p


class KVCacheFullError(ValueError):
    """A session outgrew the context each GPU cache slot holds (CudaBackend's max_context)."""


class DeviceKVCache:
    """One session's keys and values for a CudaRange: a slot of the range's pool in device memory.

    The same face as models.llama.KVCache (length, reserve, advance, truncate, nbytes, capacity; k
    and v are the slot's device addresses); the slot goes back to the pool when the cache is dropped."""

    def __init__(self, pool: CudaRange, slot: int):
        self.pool, self.slot, self.length = pool, slot, 0
        self.max_len = pool.ctx

    @property
    def capacity(self) -> int:
        return self.pool.ctx

    @property
    def nbytes(self) -> int:
        return 2 * self.pool.slot_bytes

    @property
    def k(self) -> int:
        return self.pool.k_cache + self.slot * self.pool.slot_bytes

    @property
    def v(self) -> int:
        return self.pool.v_cache + self.slot * self.pool.slot_bytes

    def reserve(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise KVCacheFullError(
                f"{self.length + n_new} tokens do not fit the GPU KV cache of {self.max_len} tokens a session"
            )

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (refused drafts); the next kernel overwrites them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} positions of a cache holding {self.length}")
        self.length = length

    def __del__(self) -> None:
        self.pool.release(self.slot)


class CudaRange:
    """A layer range on the GPU, what `CudaBackend.fused_range` gives models.llama.LayerRange.

    Weights are the backend's uploads (once per model); each session's KV cache is a slot of one
    device pool [slot][layer][position][G][E] (float16), grown by doubling; slot 0 takes a batch's
    padding rows. A step of at most MAX_WIDTH rows (decode) replays the CUDA graph captured for its
    width (mat-vec on 8-bit activations); longer steps (prompts) run mat-mat in PREFILL_CHUNK rows.
    Rows of different sessions mix freely: every kernel takes each row's position and slot.
    """

    kv_dtype = np.float16

    def __init__(self, dev: Device, config, layers: list, max_context: int):
        c = self.config = config
        self.dev = dev
        self.H, self.G, self.E, self.D, self.F = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim
        self.n_layers = len(layers)
        self.eps, self.rope_scale = float(c.norm_eps), float(c.rope_attn_factor)
        self.layers = [
            {
                "attn_norm": dev.upload(np.asarray(L.attn_norm, np.float32)),
                "ffn_norm": dev.upload(np.asarray(L.ffn_norm, np.float32)),
                **{k: getattr(L, k) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")},
            }
            for L in layers
        ]
        self.ctx = min(int(c.context_length), max_context)
        self.layer_stride = self.ctx * self.G * self.E  # elements
        self.slot_stride = self.n_layers * self.layer_stride
        self.slot_bytes = self.slot_stride * 2
        self.slots, self.k_cache, self.v_cache = 0, 0, 0
        self._free: list[int] = []
        self._grow(4)
        self._allocate()
        self._graphs: dict[int, CudaGraph] = {}

    # -- the cache pool ----------------------------------------------------------------------------------

    def _grow(self, slots: int) -> None:
        """A pool of `slots` (the old one's bytes copied to its front: slot is the outermost index)."""
        d, old = self.dev, (self.k_cache, self.v_cache, self.slots)
        self.k_cache, self.v_cache = d.alloc(slots * self.slot_bytes), d.alloc(slots * self.slot_bytes)
        if old[2]:
            for new, prev in zip((self.k_cache, self.v_cache), old[:2], strict=True):
                d.copy(new, prev, old[2] * self.slot_bytes)
                d.free(prev)
        self._free += range(max(old[2], 1), slots)  # slot 0: padding rows
        self.slots = slots
        self._graphs = {}  # they hold the old pool's addresses

    def new_cache(self) -> DeviceKVCache:
        with self.dev.lock:
            if not self._free:
                self._grow(2 * self.slots)
            return DeviceKVCache(self, self._free.pop(0))

    def release(self, slot: int) -> None:
        with self.dev.lock:
            self._free.append(slot)

    def _allocate(self) -> None:
        d, T, f4 = self.dev, PREFILL_CHUNK, 4
        H, G, E, D, F = self.H, self.G, self.E, self.D, self.F
        self.qkv_width = (H + 2 * G) * E
        self.x = d.alloc(T * D * f4)
        self.y = d.alloc(T * max(D, F) * f4)
        self.qkv = d.alloc(T * self.qkv_width * f4)
        self.q = d.alloc(T * H * E * f4)
        self.attn = d.alloc(T * H * E * f4)
        self.gate, self.up = d.alloc(T * F * f4), d.alloc(T * F * f4)
        self.act_q = d.alloc(T * max(D, H * E, F) // 32 * Q8_BLOCK_BYTES)
        self.hid_q = d.alloc(T * F // 32 * Q8_BLOCK_BYTES)
        parts = max(MAX_WIDTH * DECODE_SPLITS, T * PREFILL_SPLITS)  # (row, key stretch) pairs a step has at most
        self.part_ml = d.alloc(parts * H * 2 * f4)
        self.part_acc = d.alloc(parts * H * E * f4)
        self.positions, self.slot_ids = d.alloc(T * 4), d.alloc(T * 4)
        self.inv_freq = d.upload(self.config.inv_freq.astype(np.float64))  # the file's RoPE schedule

    # -- the layers --------------------------------------------------------------------------------------

    def _attention(self, layer: int, rows: int, splits: int) -> None:
        d, H, G, E = self.dev, self.H, self.G, self.E
        d.launch(
            "rope_store", "PPPiiiPfPPPlli", (rows, 1), (128, 1, 1),
            self.qkv, self.positions, self.slot_ids, H, G, E, self.inv_freq, self.rope_scale, self.q,
            self.k_cache, self.v_cache, self.slot_stride, self.layer_stride, layer,
        )  # fmt: skip
        d.launch(
            f"attend_split_e{E}", "PPPPPiilliiPP", (G, splits, rows), (128, 1, 1),
            self.q, self.k_cache, self.v_cache, self.positions, self.slot_ids, H, G,
            self.slot_stride, self.layer_stride, layer, splits, self.part_ml, self.part_acc,
        )  # fmt: skip
        d.launch("attend_combine", "PPiiiP", (H, rows), (E, 1, 1), self.part_ml, self.part_acc, H, E, splits, self.attn)

    def _layers_decode(self, width: int) -> None:
        """Every layer over `width` rows of x, one token each: mat-vec on 8-bit activations."""
        d, H, G, E, D, F = self.dev, self.H, self.G, self.E, self.D, self.F
        for i, L in enumerate(self.layers):
            d.rmsnorm_quant(self.x, L["attn_norm"], width, D, self.eps, 0, self.act_q)
            offset = 0
            for part, rows in (("wq", H * E), ("wk", G * E), ("wv", G * E)):
                w = L[part]
                d.matvec(w.fmt, w.ptr, rows, D, self.act_q, self.qkv + 4 * offset, width, self.qkv_width, False)
                offset += rows
            self._attention(i, width, DECODE_SPLITS)
            d.quantize(self.attn, width, H * E, self.act_q)
            w = L["wo"]
            d.matvec(w.fmt, w.ptr, D, H * E, self.act_q, self.x, width, D, True)
            d.rmsnorm_quant(self.x, L["ffn_norm"], width, D, self.eps, 0, self.act_q)
            g, u = L["w_gate"], L["w_up"]
            if g.qtype == u.qtype:
                d.swiglu_vec(g.fmt, g.ptr, u.ptr, F, D, self.act_q, self.hid_q, width)
            else:  # gate and up in different formats: two products, then SwiGLU
                d.matvec(g.fmt, g.ptr, F, D, self.act_q, self.gate, width, F, False)
                d.matvec(u.fmt, u.ptr, F, D, self.act_q, self.up, width, F, False)
                d.silu_mul(self.gate, self.up, self.gate, width * F)
                d.quantize(self.gate, width, F, self.hid_q)
            w = L["w_down"]
            d.matvec(w.fmt, w.ptr, D, F, self.hid_q, self.x, width, D, True)

    def _layers_prefill(self, rows: int) -> None:
        """Every layer over `rows` tokens of x: mat-mat on the tensor cores."""
        d, H, G, E, D, F = self.dev, self.H, self.G, self.E, self.D, self.F
        for i, L in enumerate(self.layers):
            d.rmsnorm_quant(self.x, L["attn_norm"], rows, D, self.eps, self.y, 0)
            offset = 0
            for part, n in (("wq", H * E), ("wk", G * E), ("wv", G * E)):
                w = L[part]
                d.matmat(w.fmt, w.ptr, n, D, self.y, rows, self.qkv + 4 * offset, self.qkv_width, False)
                offset += n
            self._attention(i, rows, PREFILL_SPLITS)
            w = L["wo"]
            d.matmat(w.fmt, w.ptr, D, H * E, self.attn, rows, self.x, D, True)
            d.rmsnorm_quant(self.x, L["ffn_norm"], rows, D, self.eps, self.y, 0)
            g, u, w = L["w_gate"], L["w_up"], L["w_down"]
            d.matmat(g.fmt, g.ptr, F, D, self.y, rows, self.gate, F, False)
            d.matmat(u.fmt, u.ptr, F, D, self.y, rows, self.up, F, False)
            d.silu_mul(self.gate, self.up, self.gate, rows * F)
            d.matmat(w.fmt, w.ptr, D, F, self.gate, rows, self.x, D, True)

    # -- a step --------------------------------------------------------------------------------------------

    def forward(self, x: np.ndarray, cos, sin, seqs: list[tuple]) -> np.ndarray:
        """x [T, D] through the range; seqs: per sequence (rows, start, k cache, v cache, capacity) in
        row order, the k cache a DeviceKVCache's address (RoPE is computed here: cos and sin unused)."""
        with self.dev.lock:
            return self._forward(x, seqs)

    def _forward(self, x: np.ndarray, seqs: list[tuple]) -> np.ndarray:
        positions = np.concatenate([np.arange(s, s + n) for n, s, *_ in seqs]).astype(np.int32)
        slots = np.concatenate([np.full(n, (k - self.k_cache) // self.slot_bytes) for n, _, k, *_ in seqs])
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, d = x.shape[0], self.dev
        if T <= MAX_WIDTH:
            width = width_for(T)
            pad = width - T
            d.to_device(self.x, np.concatenate([x, np.zeros((pad, self.D), np.float32)]) if pad else x)
            d.to_device(self.positions, np.concatenate([positions, np.zeros(pad, np.int32)]))
            d.to_device(self.slot_ids, np.concatenate([slots, np.zeros(pad)]).astype(np.int32))
            if width not in self._graphs:
                graph = d.graph()
                with graph:
                    self._layers_decode(width)
                self._graphs[width] = graph
            self._graphs[width].replay()
            return d.to_host(self.x, (width, self.D))[:T]
        out = np.empty_like(x)
        for b in range(0, T, PREFILL_CHUNK):
            n = min(PREFILL_CHUNK, T - b)
            d.to_device(self.x, x[b : b + n])
            d.to_device(self.positions, positions[b : b + n])
            d.to_device(self.slot_ids, slots[b : b + n].astype(np.int32))
            self._layers_prefill(n)
            out[b : b + n] = d.to_host(self.x, (n, self.D))
        return out


class CudaBackend(OwnMatmulBackend):
    """`--backend cuda`: a layer range runs on the GPU as one CudaRange (`fused_range`, as the C
    backend's), and the head's product on the GPU too; the rest (the head's norm, formats the kernels
    do not read, architectures they do not run) by the NumPy formulas. max_context: positions each
    session's GPU KV cache holds at most (the model's own context where that is smaller)."""

    name = "cuda"

    def __init__(self, max_context: int = 4096):
        self.dev = Device()
        self.max_context = max_context
        self._scratch: dict[str, tuple[int, int]] = {}

    @property
    def description(self) -> str:
        return f"cuda ({self.dev.name})"

    def _buffer(self, key: str, nbytes: int) -> int:
        ptr, size = self._scratch.get(key, (0, 0))
        if size < nbytes:
            ptr, size = self.dev.alloc(nbytes, zero=False), nbytes
            self._scratch[key] = (ptr, size)
        return ptr

    def weight(self, raw: np.ndarray, qtype: Q, shape: tuple[int, ...]):
        if len(shape) == 3 and qtype in KERNEL_FORMATS:  # a mixture's experts: each its own matrix, left quantized
            rows = (int(shape[1]), int(shape[2]))
            return Experts(tuple(self.weight(e, qtype, rows) for e in raw.reshape(shape[0], -1)))
        if len(shape) != 2 or qtype not in KERNEL_FORMATS:
            w = dequantize(raw, qtype, shape)  # norms, experts, other formats: the NumPy reference's form
            return np.ascontiguousarray(np.swapaxes(w, -1, -2) if w.ndim >= 2 else w, dtype=np.float32)
        return GpuTensor(self.dev.upload(raw), qtype, tuple(int(n) for n in shape), int(raw.nbytes))

    def fused_range(self, config, layers: list) -> CudaRange | None:
        """The layers as one CudaRange, or None where the kernels do not run this model (another
        architecture's block, a head size or width they are not built for, a weight format they do
        not read): then LayerRange runs its per-operation path, `linear` still on the GPU."""
        c = config
        if (
            set(c.features) - FUSED_FEATURES
            or c.n_experts
            or c.head_dim not in HEAD_DIMS
            or c.n_heads // c.n_kv_heads > 8
        ):
            return None
        if c.dim % 32 or c.hidden_dim % 32:
            return None
        mats = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
        if not all(isinstance(getattr(L, m), GpuTensor) for L in layers for m in mats):
            return None
        return CudaRange(self.dev, config, layers, self.max_context)

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
        with self.dev.lock:
            y = self._linear_dev(x, w, "y")
            return self.dev.to_host(y, (x.shape[0], w.shape[0]))

    def pick(self, x, w, params: np.ndarray, want_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """The head's product and the `sample` kernel on it: rows x 4 bytes come back, and the logits only
        when some row needs them on the host (copied before the kernel scales them in place)."""
        if isinstance(w, np.ndarray):
            raise TypeError("pick needs the head's weight on the GPU")
        rows, vocab = x.shape[0], w.shape[0]
        with self.dev.lock:
            y = self._linear_dev(x, w, "y")
            logits = self.dev.to_host(y, (rows, vocab)) if want_logits else None
            p = self._buffer("sample_params", rows * SAMPLE_PARAMS.itemsize)
            self.dev.to_device(p, np.asarray(params, SAMPLE_PARAMS))
            tokens = self._buffer("sample_tokens", rows * 4)
            self.dev.sample(y, vocab, p, tokens, rows)
            return logits, self.dev.to_host(tokens, (rows,), np.int32)
