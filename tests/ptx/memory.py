"""Device memory for the emulator, with compute-sanitizer's memory checks built in.

Global memory is one growing byte arena; every allocation sits between red zones, so an access is
valid only inside an allocation made through the fake driver (or a module variable). Shared memory
is one window per block, with per-byte shadow state: written yet (uninitialised reads), and which
lane wrote it and which lane (or lanes) read it in which barrier interval: between two barriers, a
byte written by one thread and written or read by another is a race.
"""

from __future__ import annotations

import bisect

import numpy as np

GLOBAL_BASE = 0x7F00_0000_0000
ALIGN = 256
RED_ZONE = 256


class SanitizerError(RuntimeError):
    """What compute-sanitizer would report: the kernel, the address and the lanes involved."""


def lanes_text(lanes: np.ndarray) -> str:
    shown = ", ".join(str(int(x)) for x in lanes[:8])
    return f"[{shown}{', ...' if len(lanes) > 8 else ''}] ({len(lanes)} lanes)"


def byte_indices(offsets: np.ndarray, nbytes: int) -> np.ndarray:
    return (offsets[:, None] + np.arange(nbytes, dtype=np.int64)).reshape(-1)


class GlobalMemory:
    def __init__(self) -> None:
        self.data = np.zeros(1 << 20, np.uint8)
        self.top = 0  # arena offset of the next allocation
        self.starts: list[int] = []  # sorted arena offsets of live allocations
        self.sizes: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        start = self.top + RED_ZONE
        start = (start + ALIGN - 1) // ALIGN * ALIGN
        self.top = start + nbytes
        if self.top + RED_ZONE > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.top + RED_ZONE + (1 << 20)), np.uint8)
            grown[: len(self.data)] = self.data
            self.data = grown
        self.data[start : start + nbytes] = 0xCD  # device memory is not zeroed by mem_alloc
        bisect.insort(self.starts, start)
        self.sizes[start] = nbytes
        return GLOBAL_BASE + start

    def free(self, addr: int) -> None:
        start = addr - GLOBAL_BASE
        self.starts.remove(start)
        del self.sizes[start]

    def check(self, addrs: np.ndarray, nbytes: int, lanes: np.ndarray, kernel: str, what: str) -> np.ndarray:
        """Arena offsets of `addrs`, after checking alignment and that each access lies in one allocation."""
        offs = addrs.astype(np.int64) - GLOBAL_BASE
        bad = offs % nbytes != 0
        if bad.any():
            raise SanitizerError(
                f"{kernel}: misaligned {what} of {nbytes} bytes at 0x{int(addrs[bad][0]):x} "
                f"by lanes {lanes_text(lanes[bad])}"
            )
        starts = np.asarray(self.starts, np.int64)
        sizes = np.asarray([self.sizes[s] for s in self.starts], np.int64)
        i = np.searchsorted(starts, offs, side="right") - 1
        ok = i >= 0
        ok[ok] &= offs[ok] + nbytes <= starts[i[ok]] + sizes[i[ok]]
        if not ok.all():
            raise SanitizerError(
                f"{kernel}: out-of-bounds global {what} of {nbytes} bytes at 0x{int(addrs[~ok][0]):x} "
                f"by lanes {lanes_text(lanes[~ok])}"
            )
        return offs

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.data[offset : offset + nbytes]


class SharedMemory:
    """The shared windows of every block of a launch, `size` bytes each."""

    def __init__(self, blocks: int, size: int) -> None:
        self.size = size
        n = max(blocks * size, 16)
        self.data = np.zeros(n, np.uint8)
        self.written = np.zeros(n, bool)
        self.writer = np.full(n, -1, np.int32)  # thread index in its block
        self.interval = np.full(n, -1, np.int32)  # the barrier interval of that write
        self.reader = np.full(n, -1, np.int32)  # the thread that read it, -2 for several
        self.read_interval = np.full(n, -1, np.int32)

    def check(self, addrs, nbytes, blocks, lanes, kernel, what) -> np.ndarray:
        addrs = addrs.astype(np.int64)
        bad = (addrs < 0) | (addrs + nbytes > self.size)
        if bad.any():
            raise SanitizerError(
                f"{kernel}: out-of-bounds shared {what} of {nbytes} bytes at 0x{int(addrs[bad][0]):x} "
                f"(the block has {self.size} bytes) by lanes {lanes_text(lanes[bad])}"
            )
        bad = addrs % nbytes != 0
        if bad.any():
            raise SanitizerError(
                f"{kernel}: misaligned shared {what} at 0x{int(addrs[bad][0]):x} by lanes {lanes_text(lanes[bad])}"
            )
        return blocks.astype(np.int64) * self.size + addrs

    def on_read(self, offs, nbytes, threads, intervals, kernel) -> None:
        idx = byte_indices(offs, nbytes)
        t = np.repeat(threads, nbytes)
        if not self.written[idx].all():
            bad = ~self.written[idx]
            raise SanitizerError(
                f"{kernel}: read of uninitialised shared memory at 0x{int(idx[bad][0] % self.size):x} "
                f"by threads {lanes_text(np.unique(t[bad]))}"
            )
        hazard = (self.interval[idx] == np.repeat(intervals, nbytes)) & (self.writer[idx] != t)
        if hazard.any():
            a = int(idx[hazard][0])
            raise SanitizerError(
                f"{kernel}: shared memory race (read after write, no barrier between) at 0x{a % self.size:x}: "
                f"thread {int(self.writer[a])} wrote, threads {lanes_text(np.unique(t[hazard]))} read"
            )
        iv = np.repeat(intervals, nbytes)
        again = (self.read_interval[idx] == iv) & (self.reader[idx] != t)
        self.reader[idx] = np.where(again, -2, t)
        order = np.argsort(idx, kind="stable")
        several = (np.diff(idx[order]) == 0) & (np.diff(t[order]) != 0)
        self.reader[idx[order][1:][several]] = -2
        self.read_interval[idx] = iv

    def on_write(self, offs, nbytes, threads, intervals, kernel) -> None:
        idx = byte_indices(offs, nbytes)
        t = np.repeat(threads, nbytes)
        iv = np.repeat(intervals, nbytes)
        order = np.argsort(idx, kind="stable")
        same = (np.diff(idx[order]) == 0) & (np.diff(t[order]) != 0)
        if same.any():
            k = np.nonzero(same)[0][0]
            raise SanitizerError(
                f"{kernel}: shared memory race (two threads write one address in one instruction) at "
                f"0x{int(idx[order][k] % self.size):x}: threads {int(t[order][k])} and {int(t[order][k + 1])}"
            )
        hazard = (self.interval[idx] == iv) & (self.writer[idx] != t) & (self.writer[idx] >= 0)
        if hazard.any():
            a = int(idx[hazard][0])
            raise SanitizerError(
                f"{kernel}: shared memory race (write after write, no barrier between) at 0x{a % self.size:x}: "
                f"threads {int(self.writer[a])} and {lanes_text(np.unique(t[hazard]))}"
            )
        hazard = (self.read_interval[idx] == iv) & (self.reader[idx] != t)
        if hazard.any():
            a = int(idx[hazard][0])
            who = "several threads" if self.reader[a] == -2 else f"thread {int(self.reader[a])}"
            raise SanitizerError(
                f"{kernel}: shared memory race (write after read, no barrier between) at 0x{a % self.size:x}: "
                f"{who} read, threads {lanes_text(np.unique(t[hazard]))} wrote"
            )
        self.written[idx] = True
        self.writer[idx] = t
        self.interval[idx] = iv
