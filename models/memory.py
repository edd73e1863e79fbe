"""Giving freed memory back to the system, after a load and after a burst of work."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None
if _libc is not None and not hasattr(_libc, "malloc_trim"):  # not glibc (musl, macOS)
    _libc = None


def release_memory() -> None:
    """Cycles collected, then glibc's free lists trimmed: reading a GGUF file's vocabulary leaves ~10 MB
    of freed small blocks that would otherwise stay resident (and count in every later peak)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
