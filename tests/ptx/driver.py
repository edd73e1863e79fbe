"""A fake of the pycuda.driver calls kernels/cuda_backend.py makes, backed by the PTX emulator.

`install(monkeypatch)` puts it in sys.modules as pycuda.driver, so the production Device class runs
unchanged: module_from_buffer ignores the fatbin's bytes and loads the PTX that tests/ptx/compile.py
built from the same sources (tests/test_cuda_emulated.py checks that the committed fatbin was built
from them too). Streams run every launch and copy at once; they are in order, so that is the same.
"""

from __future__ import annotations

import importlib.machinery
import struct
import sys
import threading
import types
from dataclasses import dataclass, field

import numpy as np

from tests.ptx import compile as ptx_compile
from tests.ptx.emulator import Program
from tests.ptx.memory import GLOBAL_BASE, GlobalMemory
from tests.ptx.parse import parse

_ARG = {"P": "<Q", "i": "<i", "l": "<q", "f": "<f", "I": "<I", "d": "<d"}


class device_attribute:  # noqa: N801 (pycuda's name)
    INTEGRATED = "INTEGRATED"
    MULTIPROCESSOR_COUNT = "MULTIPROCESSOR_COUNT"


@dataclass
class FakeGpu:
    """The emulated device's state: its memory, what it is, and a log of every launch."""

    integrated: bool = False
    memory: GlobalMemory = field(default_factory=GlobalMemory)
    launches: list[str] = field(default_factory=list)
    ptx: str | None = None  # None: the product's kernels
    program: Program | None = None  # the PTX parsed once, however many Devices load the module
    _capturing: threading.local = field(default_factory=threading.local)

    @property
    def capture(self) -> list | None:
        """Launches recorded while this thread's stream capture is open (capture is per thread, as
        the product's cuStreamBeginCapture mode)."""
        return getattr(self._capturing, "launches", None)

    @capture.setter
    def capture(self, launches: list | None) -> None:
        self._capturing.launches = launches

    def offset(self, ptr: int, nbytes: int) -> int:
        off = int(ptr) - GLOBAL_BASE
        starts = [s for s in self.memory.starts if s <= off]
        if not starts or off + nbytes > starts[-1] + self.memory.sizes[starts[-1]]:
            raise RuntimeError(f"copy of {nbytes} bytes at 0x{int(ptr):x} is outside every allocation")
        return off


class DeviceAllocation:
    def __init__(self, gpu: FakeGpu, nbytes: int):
        self.gpu, self.ptr = gpu, gpu.memory.alloc(nbytes)

    def __int__(self) -> int:
        return self.ptr

    __index__ = __int__

    def free(self) -> None:
        self.gpu.memory.free(self.ptr)


class Function:
    def __init__(self, gpu: FakeGpu, program: Program, name: str):
        self.gpu, self.kernel, self.name, self.argtypes = gpu, program.kernel(name), name, None

    def prepare(self, argtypes: str) -> Function:
        self.argtypes = argtypes
        return self

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        raw = [struct.pack(_ARG[t], int(a) if t in "PilI" else a) for t, a in zip(self.argtypes, args, strict=True)]
        params = self.kernel.pack_params(raw)

        def run():
            self.gpu.launches.append(self.name)
            self.kernel.launch(self.gpu.memory, grid, block, params, shared_size)

        if self.gpu.capture is not None:
            self.gpu.capture.append(run)
        else:
            run()

    def prepared_call(self, grid, block, *args, shared_size: int = 0) -> None:
        self.prepared_async_call(grid, block, None, *args, shared_size=shared_size)


class Module:
    def __init__(self, gpu: FakeGpu):
        if gpu.program is None:
            text = gpu.ptx if gpu.ptx is not None else ptx_compile.product_ptx()[0]
            gpu.program = Program(parse(text), gpu.memory)
        self.gpu, self.program = gpu, gpu.program

    def get_function(self, name: str) -> Function:
        return Function(self.gpu, self.program, name)


class Stream:
    _next = 1

    def __init__(self):
        self.handle = Stream._next
        Stream._next += 1

    def synchronize(self) -> None:
        pass


def make_driver(gpu: FakeGpu) -> types.ModuleType:
    """A module object with pycuda.driver's names, over one FakeGpu."""
    cuda = types.ModuleType("pycuda.driver")

    class Context:
        def push(self):
            pass

        def pop(self):
            pass

    class Device:
        def __init__(self, ordinal: int):
            self.ordinal = ordinal

        def name(self) -> str:
            return "emulated (PTX on the CPU)"

        def get_attribute(self, attr):
            return {"INTEGRATED": int(gpu.integrated), "MULTIPROCESSOR_COUNT": 16}[attr]

        def retain_primary_context(self):
            return Context()

    class HostRegistration:
        """register_host_memory: the pages copied once into device memory (the product maps them read-only)."""

        def __init__(self, array: np.ndarray):
            self.alloc = DeviceAllocation(gpu, array.nbytes)
            raw = np.asarray(array).reshape(-1).view(np.uint8)
            gpu.memory.view(self.alloc.ptr - GLOBAL_BASE, array.nbytes)[:] = raw
            self.base = self

        def get_device_pointer(self) -> int:
            return self.alloc.ptr

    def htod(ptr, array, stream=None):
        b = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        gpu.memory.view(gpu.offset(ptr, b.size), b.size)[:] = b

    def dtoh(out, ptr, stream=None):
        b = out.reshape(-1).view(np.uint8)
        b[:] = gpu.memory.view(gpu.offset(ptr, b.size), b.size)

    def dtod(dst, src, n, stream=None):
        gpu.memory.view(gpu.offset(dst, n), n)[:] = gpu.memory.view(gpu.offset(src, n), n)

    def memset_d8(ptr, value, n):
        gpu.memory.view(gpu.offset(ptr, n), n)[:] = value

    cuda.init = lambda: None
    cuda.Device = Device
    cuda.device_attribute = device_attribute
    cuda.module_from_buffer = lambda data: Module(gpu)
    cuda.Stream = Stream
    cuda.mem_alloc = lambda n: DeviceAllocation(gpu, n)
    cuda.memset_d8 = memset_d8
    cuda.memcpy_htod = htod
    cuda.memcpy_htod_async = htod
    cuda.memcpy_dtoh = dtoh
    cuda.memcpy_dtoh_async = dtoh
    cuda.memcpy_dtod = dtod
    cuda.memcpy_dtod_async = dtod
    cuda.register_host_memory = lambda array, flags=0: HostRegistration(array)
    return cuda


def graph_class(gpu: FakeGpu) -> type:
    """A stand-in for kernels.cuda_backend.CudaGraph (the one place the product calls libcuda itself):
    launches inside `with graph:` are recorded, and replay() runs them again."""

    class FakeGraph:
        def __init__(self, stream_handle: int):
            self.recorded: list = []

        def __enter__(self):
            if gpu.capture is not None:
                raise RuntimeError("a stream capture is already open")
            gpu.capture = self.recorded
            return self

        def __exit__(self, *exc) -> None:
            gpu.capture = None

        def replay(self) -> None:
            for launch in self.recorded:
                launch()

    return FakeGraph


def install(monkeypatch, gpu: FakeGpu) -> types.ModuleType:
    """pycuda and pycuda.driver in sys.modules, the fake graph as CudaGraph, and NVML's answer made
    "a GPU is here", for this test only: `select_backend("cuda" | "auto")` then takes the product's
    own path (kernels.cuda_backend.available) to the emulated GPU."""
    from kernels import cuda_backend

    cuda = make_driver(gpu)
    pkg = types.ModuleType("pycuda")
    pkg.__spec__ = importlib.machinery.ModuleSpec("pycuda", None)  # importlib.util.find_spec finds it
    pkg.driver = cuda
    monkeypatch.setattr(cuda_backend, "gpu_present", lambda: True)
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setattr(cuda_backend, "CudaGraph", graph_class(gpu))
    return cuda
