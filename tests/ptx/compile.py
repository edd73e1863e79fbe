"""PTX for the emulator from nvcc: the product's kernel sources with build.py's flags, or a test's own .cu text.

Compiling the unity build takes seconds, so the PTX is cached on disk under a key made of the sources'
hashes, the flags and nvcc's version; a changed source gets a fresh PTX.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from kernels.cuda import build

PTX_ARCH = "compute_87"  # Jetson Orin, the oldest chip the fatbin targets
FLAGS = tuple(f for f in build.NVCC_FLAGS if f not in ("-Xptxas", "-v"))  # -ptx runs no ptxas
CACHE = Path(os.environ.get("APPLIANCE_PTX_CACHE", Path(tempfile.gettempdir()) / "appliance-ptx"))


@functools.cache
def _nvcc() -> tuple[str, str]:
    nvcc = build.find_nvcc()
    return nvcc, build.nvcc_version(nvcc)


def _compile(source: Path, include: Path, key: str) -> str:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{key}.ptx"
    if not out.exists():
        nvcc, _ = _nvcc()
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc, "-ptx", *FLAGS, f"-arch={PTX_ARCH}", f"-I{include}", str(source), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise build.BuildError(f"nvcc -ptx failed on {source.name}:\n{proc.stderr[-4000:]}")
        tmp.replace(out)  # atomic: a concurrent test never reads half a file
    return out.read_text()


def product_ptx() -> tuple[str, dict[str, str]]:
    """PTX of kernels/cuda/appliance_kernels.cu and the source hashes it was built from."""
    hashes = build.source_hashes()
    key = hashlib.sha256(repr((sorted(hashes.items()), FLAGS, PTX_ARCH, _nvcc()[1])).encode()).hexdigest()[:32]
    return _compile(build.UNITY, build.HERE, key), hashes


def cu_ptx(text: str) -> str:
    """PTX of a test's own CUDA source (it may include the product's common.cuh)."""
    key = hashlib.sha256(repr((text, FLAGS, PTX_ARCH, _nvcc()[1])).encode()).hexdigest()[:32]
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / f"{key}.cu"
    if not src.exists():
        src.write_text(text)
    return _compile(src, build.HERE, key)
