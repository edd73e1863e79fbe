"""Every launch on two devices, each read-back compared: the emulator's kernel tests on a real GPU.

`MirrorDevice(reference, subject)` is a kernels.cuda_backend.Device whose allocations, uploads,
copies and launches happen on both (the subject's pointers found from the reference's), and whose
`to_host` reads both, records any difference beyond rounding in `mismatches`, and returns the
subject's bytes, so the test's own assertions judge the subject too. `make gpu-check` runs
tests/test_cuda_emulated.py with MIRROR_ENV set: reference the emulator, subject the GPU. Without a
GPU, tests/test_ptx_emulator.py checks the comparison with the emulator on both sides.
"""

from __future__ import annotations

import bisect

import numpy as np

from kernels.cuda_backend import Device

MIRROR_ENV = "APPLIANCE_CUDA_MIRROR"
RTOL = 2e-3  # the emulator computes approximate instructions (ex2.approx, rsqrt.approx) exactly


class MirrorDevice(Device):
    def __init__(self, reference: Device, subject: Device):  # noqa: D107 (no Device.__init__: no context of its own)
        self.reference, self.subject = reference, subject
        self.name = f"{reference.name} mirrored on {subject.name}"
        self.integrated, self.sms = subject.integrated, subject.sms
        self._starts: list[int] = []  # the reference's allocations, sorted: start -> (size, subject's start)
        self._pairs: dict[int, tuple[int, int]] = {}
        self.mismatches: list[str] = []
        self.last_launch = "(none)"

    def _pair(self, ref: int, sub: int, nbytes: int) -> int:
        bisect.insort(self._starts, ref)
        self._pairs[ref] = (nbytes, sub)
        return ref

    def translate(self, ptr: int) -> int:
        """The subject's address for a reference address inside one of the mirrored allocations."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0 or ptr >= self._starts[i] + self._pairs[self._starts[i]][0]:
            raise ValueError(f"0x{ptr:x} is in no mirrored allocation")
        start = self._starts[i]
        return self._pairs[start][1] + (ptr - start)

    def alloc(self, nbytes: int, zero: bool = True) -> int:
        return self._pair(self.reference.alloc(nbytes, zero), self.subject.alloc(nbytes, zero), max(nbytes, 256))

    def upload(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        return self._pair(self.reference.upload(array), self.subject.upload(array), array.nbytes)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        self.reference.to_device(ptr, array)
        self.subject.to_device(self.translate(ptr), array)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.reference.copy(dst, src, nbytes)
        self.subject.copy(self.translate(dst), self.translate(src), nbytes)

    def launch(self, name: str, argtypes: str, grid, block, *args) -> None:
        self.last_launch = name
        self.reference.launch(name, argtypes, grid, block, *args)
        sub = [self.translate(a) if t == "P" and a else a for t, a in zip(argtypes, args, strict=True)]
        self.subject.launch(name, argtypes, grid, block, *sub)

    def to_host(self, ptr: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        want = self.reference.to_host(ptr, shape, dtype)
        got = self.subject.to_host(self.translate(ptr), shape, dtype)
        why = differences(want, got)
        if why:
            self.mismatches.append(f"after {self.last_launch}, {shape} {np.dtype(dtype)} at 0x{ptr:x}: {why}")
        return got


def differences(want: np.ndarray, got: np.ndarray) -> str:
    """'' where two read-backs agree: integers exactly (an int8 quantization within 1, a rounding
    boundary), floats within RTOL of the array's scale; else what differs, field by field."""
    if want.dtype.names:
        parts = [f"{n}: {d}" for n in want.dtype.names if (d := differences(want[n], got[n]))]
        return "; ".join(parts)
    a, b = want.astype(np.float64), got.astype(np.float64)
    if np.issubdtype(want.dtype, np.integer):
        limit = 1 if want.dtype.itemsize == 1 else 0
        bad = np.abs(a - b) > limit
    else:
        scale = float(np.nanmax(np.abs(a))) if a.size and np.isfinite(a).any() else 1.0
        bad = ~(np.abs(a - b) <= RTOL * scale + 1e-6) & ~(np.isnan(a) & np.isnan(b))
    if not bad.any():
        return ""
    at = np.argwhere(bad)[0]
    return (
        f"{int(bad.sum())} of {bad.size} differ, first at {tuple(int(i) for i in at)}: {a[tuple(at)]} vs {b[tuple(at)]}"
    )
