"""Run a PTX kernel on the CPU: every thread of a launch is one NumPy lane, executed SIMT-style.

ops.py decodes the instructions. The scheduler here keeps groups of lanes by program counter and
always runs the group with the lowest one, so lanes that branched apart run in turn and merge again
where their paths meet. A barrier parks lanes until every thread of their block is parked at it (if
any thread of the block waits elsewhere or has exited, that is a SanitizerError).
"""

from __future__ import annotations

import os

import numpy as np

from tests.ptx.memory import GLOBAL_BASE, GlobalMemory, SanitizerError, SharedMemory, lanes_text
from tests.ptx.ops import BARRIER, BRANCH, DT, EXIT, NORMAL, EmulatorError, Lanes, decode
from tests.ptx.parse import Function, Module

__all__ = ["EmulatorError", "Kernel", "Program", "SanitizerError"]


class Kernel:
    """One decoded entry: its ops, registers, shared-memory layout and parameter layout."""

    def __init__(self, fn: Function, module: Module, module_symbols: dict[str, int]):
        self.name = fn.name
        shared, off = {}, 0
        for v in [*fn.variables, *(v for v in module.variables if v.space == "shared")]:
            if v.space != "shared":
                raise EmulatorError(f"{fn.name}: {v.space} variable {v.name} is not emulated")
            if v.count is None:  # extern: dynamic shared memory, after the static variables
                continue
            off = (off + v.align - 1) // v.align * v.align
            shared[v.name] = off
            off += v.nbytes
        self.static_shared = (off + 15) // 16 * 16
        for v in module.variables:
            if v.space == "shared" and v.count is None:
                shared[v.name] = self.static_shared
        self.ops, self.decoder = decode(fn, module_symbols, shared)
        self.param_bytes = self.decoder.param_bytes

    def pack_params(self, args: list[bytes]) -> bytes:
        """Parameters at their aligned offsets; `args` are each parameter's bytes in order."""
        buf = bytearray(max(self.param_bytes, 1))
        for (name, _, size), raw in zip(self.decoder.fn.params, args, strict=True):
            if len(raw) != size:
                raise EmulatorError(f"{self.name}: parameter {name} takes {size} bytes, got {len(raw)}")
            o = self.decoder.params[name]
            buf[o : o + size] = raw
        return bytes(buf)

    def launch(self, gmem: GlobalMemory, grid, block, params: bytes, shared_bytes: int = 0, max_lanes: int = 16384):
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        bsize, nblocks = int(np.prod(block)), int(np.prod(grid))
        per = max(1, max_lanes // bsize)
        with np.errstate(all="ignore"):  # IEEE results (inf, nan) are the GPU's too, not errors
            for first in range(0, nblocks, per):
                self._run(gmem, grid, block, params, shared_bytes, first, min(nblocks, first + per))

    def lanes_text(self, gmem, grid, block, params, shared_bytes, first, last) -> Lanes:
        D = self.decoder
        bsize = int(np.prod(block))
        n = (last - first) * bsize
        S = Lanes()
        S.n, S.bsize, S.kernel, S.gmem, S.params = n, bsize, self.name, gmem, params
        S.R = [np.zeros(n, dt) for dt in D.storage]
        g = np.arange(n, dtype=np.int64)
        S.block, S.thread = g // bsize, (g % bsize).astype(np.int32)
        S.lane = (S.thread % 32).astype(np.uint32)
        lin = S.block + first
        coords = {
            "%tid": (S.thread % block[0], (S.thread // block[0]) % block[1], S.thread // (block[0] * block[1])),
            "%ctaid": (lin % grid[0], (lin // grid[0]) % grid[1], lin // (grid[0] * grid[1])),
        }
        for name, xyz in coords.items():
            for d, v in zip("xyz", xyz, strict=True):
                S.R[D.index[f"{name}.{d}"]][:] = v
        for name, dims in (("%ntid", block), ("%nctaid", grid)):
            for d, v in zip("xyz", dims, strict=True):
                S.R[D.index[f"{name}.{d}"]][:] = v
        S.R[D.index["%laneid"]][:] = S.lane
        S.R[D.index["%warpid"]][:] = S.thread // 32
        S.interval = np.zeros(last - first, np.int32)
        S.smem = SharedMemory(last - first, self.static_shared + shared_bytes)
        S.set_mask(np.ones(n, bool))
        return S

    def _run(self, gmem, grid, block, params, shared_bytes, first, last) -> None:
        S = self.lanes_text(gmem, grid, block, params, shared_bytes, first, last)
        ops, n = self.ops, S.n
        groups: dict[int, np.ndarray] = {}  # runnable lanes waiting at a pc
        parked: dict[int, np.ndarray] = {}  # lanes waiting at a barrier
        exited = np.zeros(n, bool)
        pc, mask = 0, np.ones(n, bool)
        budget = int(os.environ.get("PTX_STEP_BUDGET", 1_000_000))  # lane-group steps; a hung kernel fails
        steps = 0

        def next_group():
            nonlocal pc, mask
            if groups:
                pc = min(groups)
                mask = groups.pop(pc)
                return True
            if not parked:
                return False
            self._release(S, parked, groups, exited)
            return next_group()

        def park(at, m):
            if at in groups:
                groups[at] = groups[at] | m
            else:
                groups[at] = m

        while True:
            steps += 1
            if steps > budget:
                raise EmulatorError(f"{self.name}: no progress after {steps} steps (an endless loop?)")
            if mask is not S.mask:
                S.set_mask(mask)
            o = ops[pc]
            m = mask
            if o.guard is not None:
                g = S.R[o.guard] ^ o.negate
                m = mask & g
            if o.kind == NORMAL:
                if m is not mask:
                    if m.any():
                        S.set_mask(m)
                        o.fn(S)
                else:
                    o.fn(S)
                pc += 1
                if pc in groups:
                    mask = mask | groups.pop(pc)
                continue
            if o.kind == BRANCH:
                taken = m
                rest = mask & ~taken
                if not rest.any():
                    pc = o.fn
                elif not taken.any():
                    pc += 1
                else:
                    park(o.fn, taken)
                    park(pc + 1, rest)
                    next_group()
                    continue
                if groups and min(groups) < pc:
                    park(pc, mask)
                    next_group()
                elif pc in groups:
                    mask = mask | groups.pop(pc)
                continue
            if o.kind == EXIT:
                exited |= m
                rest = mask & ~m
                if rest.any():
                    pc += 1
                    mask = rest
                    if pc in groups:
                        mask = mask | groups.pop(pc)
                    continue
            elif o.kind == BARRIER:
                parked[pc] = parked[pc] | m if pc in parked else m
                rest = mask & ~m
                if rest.any():
                    park(pc + 1, rest)
            if not next_group():
                return

    def _release(self, S: Lanes, parked: dict, groups: dict, exited: np.ndarray) -> None:
        """Every thread of a block parked at one barrier: release them into the next interval."""
        at = np.full(S.n, -1, np.int64)
        for pc, m in parked.items():
            at[m] = pc
        per_block = at.reshape(-1, S.bsize)
        first = per_block[:, :1]
        whole = (per_block == first).all(axis=1) & (first[:, 0] >= 0)
        waiting = (per_block >= 0).any(axis=1)
        bad = waiting & ~whole
        if bad.any():
            b = int(np.nonzero(bad)[0][0])
            row = per_block[b]
            pcs = sorted({int(p) for p in row if p >= 0})
            ex = np.nonzero(exited.reshape(-1, S.bsize)[b])[0]
            away = np.nonzero(row != pcs[0])[0]
            line = self.ops[pcs[0]].ins.line
            raise SanitizerError(
                f"{self.name}: barrier '{line}' (instruction {pcs[0]}) not reached by all threads of block "
                f"{b}: threads {lanes_text(away)} did not arrive" + (f" ({len(ex)} had exited)" if len(ex) else "")
            )
        S.interval[whole] += 1
        for pc in list(parked):
            m = parked.pop(pc)
            if m.any():
                groups[pc + 1] = groups[pc + 1] | m if pc + 1 in groups else m


class Program:
    """A PTX module loaded into a GlobalMemory: its variables allocated, its kernels decoded on first use."""

    def __init__(self, module: Module, gmem: GlobalMemory):
        self.module, self.gmem = module, gmem
        self.symbols: dict[str, int] = {}
        for v in module.variables:
            if v.space in ("global", "const"):
                addr = gmem.alloc(max(v.nbytes, 1))
                raw = np.zeros(v.nbytes, np.uint8)
                if v.init:
                    raw[:] = np.array(v.init, np.uint64).astype(DT[v.type]).view(np.uint8)
                gmem.view(addr - GLOBAL_BASE, v.nbytes)[:] = raw
                self.symbols[v.name] = addr
        self._kernels: dict[str, Kernel] = {}

    def kernel(self, name: str) -> Kernel:
        if name not in self._kernels:
            fn = self.module.functions.get(name)
            if fn is None or not fn.entry:
                raise EmulatorError(f"no kernel named {name!r} in the module")
            self._kernels[name] = Kernel(fn, self.module, self.symbols)
        return self._kernels[name]
