"""PTX instructions decoded once into closures over the lane state (Lanes): what each opcode does.

A closure reads its operands as NumPy arrays over every lane of the launch and writes its result to
the active lanes only. Memory instructions go through memory.py's checks; shfl, vote and the WMMA
instructions also check that the whole warp takes part. An opcode not here is an EmulatorError naming
it, raised when its kernel is decoded.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

from tests.ptx.memory import SanitizerError, lanes_text
from tests.ptx.parse import Function, Instruction, type_bytes

DT = {
    "b8": np.uint8, "u8": np.uint8, "s8": np.int8,
    "b16": np.uint16, "u16": np.uint16, "s16": np.int16, "f16": np.float16,
    "b32": np.uint32, "u32": np.uint32, "s32": np.int32, "f32": np.float32, "f16x2": np.uint32,
    "b64": np.uint64, "u64": np.uint64, "s64": np.int64, "f64": np.float64, "pred": np.bool_,
}  # fmt: skip
SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SPECIAL = ("%tid", "%ntid", "%ctaid", "%nctaid")
NORMAL, BRANCH, EXIT, BARRIER = range(4)


class EmulatorError(RuntimeError):
    pass


@dataclass
class Op:
    kind: int
    fn: object  # fn(S) for NORMAL; for BRANCH the target pc
    guard: int | None  # register index of the guard predicate
    negate: bool
    ins: Instruction


class Lanes:
    """The lane state of one launch: registers, the active mask, where each lane sits in the grid."""

    __slots__ = (
        "R", "mask", "full", "lanes", "n", "block", "thread", "lane", "interval", "gmem", "smem",
        "local", "params", "kernel", "bsize",
    )  # fmt: skip

    def set_mask(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.lanes = np.flatnonzero(mask)
        self.full = len(self.lanes) == self.n


def _imm(text: str, t: str):
    dt = np.dtype(DT[t])
    if text.startswith(("0f", "0F")):
        v = struct.unpack("<f", struct.pack("<I", int(text[2:], 16)))[0]
        return np.float32(v).astype(dt) if dt.kind == "f" else np.float32(v).view(np.uint32).astype(dt)
    if text.startswith(("0d", "0D")):
        v = struct.unpack("<d", struct.pack("<Q", int(text[2:], 16)))[0]
        return np.float64(v).astype(dt)
    v = int(text.rstrip("U"), 0)
    if dt.kind == "f":
        return dt.type(v)
    if dt.kind == "b":
        return np.bool_(v)
    bits = dt.itemsize * 8
    return np.array(v & ((1 << bits) - 1), UNSIGNED[dt.itemsize]).view(dt)[()]


class Decoder:
    """Turns one function's instructions into Ops; symbols resolve to shared offsets or global addresses."""

    def __init__(self, fn: Function, module_symbols: dict[str, int], shared: dict[str, int]):
        self.fn = fn
        self.index: dict[str, int] = {}
        self.storage: list[np.dtype] = []
        for name, typ in fn.regs.items():
            self._reg(name, "u8" if typ == "b8" else typ)
        for s in SPECIAL:
            for d in "xyz":
                self._reg(f"{s}.{d}", "u32")
        self._reg("%laneid", "u32")
        self._reg("%warpid", "u32")
        self.symbols = {**module_symbols, **shared}
        self.params = {}
        off = 0
        for name, _, size in fn.params:
            align = min(size, 8)
            off = (off + align - 1) // align * align
            self.params[name] = off
            off += size
        self.param_bytes = off

    def _reg(self, name: str, t: str) -> None:
        self.index[name] = len(self.storage)
        self.storage.append(np.dtype(DT[t]))

    # -- operands --------------------------------------------------------------------------------------

    def src(self, op: str, t: str):
        """A reader: S -> array (or NumPy scalar) of type t."""
        dt = np.dtype(DT[t])
        if op in self.index:
            i, sd = self.index[op], self.storage[self.index[op]]
            if sd == dt:
                return lambda S: S.R[i]
            if sd.itemsize == dt.itemsize:
                return lambda S: S.R[i].view(dt)
            ext = SIGNED if sd.kind == "i" else UNSIGNED
            return lambda S: S.R[i].view(ext[sd.itemsize]).astype(dt)
        if op in self.symbols:
            v = np.array(self.symbols[op]).astype(dt)[()]
            return lambda S: v
        if re.fullmatch(r"-?(0[fFdD][0-9a-fA-F]+|0[xX][0-9a-fA-F]+|\d+)U?", op):
            v = _imm(op, t)
            return lambda S: v
        raise EmulatorError(f"{self.fn.name}: cannot read operand {op!r}")

    def dst(self, op: str, t: str):
        """A writer: (S, value of type t) -> None, on the active lanes only."""
        if op == "_":
            return lambda S, v: None
        if op not in self.index:
            raise EmulatorError(f"{self.fn.name}: cannot write operand {op!r}")
        i, sd, dt = self.index[op], self.storage[self.index[op]], np.dtype(DT[t])
        if sd.itemsize != dt.itemsize and dt.kind != "b":
            ext = SIGNED if dt.kind == "i" else UNSIGNED
            wide = np.dtype(ext[sd.itemsize])

            def put_ext(S, v):
                v = np.asarray(v).astype(dt).astype(wide)
                a = S.R[i].view(wide)
                if S.full:
                    a[...] = v
                else:
                    np.copyto(a, v, where=S.mask, casting="unsafe")

            return put_ext

        def put(S, v):
            a = S.R[i] if sd == dt else S.R[i].view(dt)
            if S.full:
                a[...] = v
            else:
                np.copyto(a, v, where=S.mask, casting="unsafe")

        return put

    def address(self, op: str):
        """[reg], [reg+imm], [sym+imm] -> S -> int64 addresses (array or scalar)."""
        m = re.fullmatch(r"\[([%$\w.]+)(?:\+(-?\w+))?\]", op.replace(" ", ""))
        if not m:
            raise EmulatorError(f"{self.fn.name}: cannot read address {op!r}")
        base, off = m.group(1), np.int64(int(m.group(2), 0) if m.group(2) else 0)
        if base in self.index:
            i = self.index[base]
            sd = self.storage[i]
            return lambda S: S.R[i].view(SIGNED[sd.itemsize]).astype(np.int64) + off
        if base in self.symbols:
            v = np.int64(self.symbols[base]) + off
            return lambda S: v
        raise EmulatorError(f"{self.fn.name}: unknown address base {base!r}")

    def vec(self, op: str) -> list[str]:
        return [x.strip() for x in op.strip("{}").split(",")] if op.startswith("{") else [op]


def _at(v, lanes: np.ndarray) -> np.ndarray:
    """An operand's values at some lanes (an immediate is the same at every lane)."""
    return v[lanes] if isinstance(v, np.ndarray) and v.ndim else np.full(len(lanes), v)


def _full(S: Lanes, v, dt) -> np.ndarray:
    return np.broadcast_to(np.asarray(v, dt), (S.n,))


# -- instruction semantics -----------------------------------------------------------------------------
# Each maker takes (decoder, instruction, opcode parts) and returns fn(S).

OPS = {}


def op(*names):
    def register(f):
        for n in names:
            OPS[n] = f
        return f

    return register


def _float_rz(exact: np.ndarray) -> np.ndarray:
    """float64 results rounded toward zero to float32."""
    f = exact.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(exact)
    return np.where(over, np.nextafter(f, np.float32(0)), f)


@op("add", "sub", "mul", "min", "max", "and", "or", "xor", "div", "rem", "copysign")
def _binary(D, ins, parts):
    base, t = parts[0], parts[-1]
    d, a, b = D.dst(ins.operands[0], t), D.src(ins.operands[1], t), D.src(ins.operands[2], t)
    dt = np.dtype(DT[t])
    if base == "mul" and parts[1] in ("wide", "hi", "lo") and dt.kind != "f":
        return _mul_int(D, ins, parts)
    if "rz" in parts and dt == np.float32:
        f = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[base]
        return lambda S: d(S, _float_rz(f(a(S).astype(np.float64), b(S).astype(np.float64))))
    if dt.kind == "f":
        f = {
            "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "min": np.fmin,
            "max": np.fmax, "copysign": lambda x, y: np.copysign(y, x),
        }[base]  # fmt: skip
    elif dt.kind == "b":
        f = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[base]
    elif base in ("div", "rem"):

        def f(x, y):
            x, y = np.asarray(x), np.asarray(y)
            safe = np.where(y == 0, 1, y).astype(dt)
            if dt.kind == "u":
                return (x // safe if base == "div" else x % safe).astype(dt)
            q = (np.abs(x.astype(np.int64)) // np.abs(safe.astype(np.int64))) * np.sign(x) * np.sign(safe)
            return (q if base == "div" else x - q * safe).astype(dt)
    else:
        f = {
            "add": np.add, "sub": np.subtract, "mul": np.multiply, "min": np.minimum, "max": np.maximum,
            "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
        }[base]  # fmt: skip
    return lambda S: d(S, f(a(S), b(S)))


def _mul_int(D, ins, parts):
    mode, t = parts[1], parts[-1]
    dt = np.dtype(DT[t])
    a, b = D.src(ins.operands[1], t), D.src(ins.operands[2], t)
    if mode == "lo":
        d = D.dst(ins.operands[0], t)
        return lambda S: d(S, np.multiply(a(S), b(S), dtype=dt))
    if dt.itemsize == 8:
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} (128-bit products) is not emulated")
    wide = np.dtype(SIGNED[2 * dt.itemsize] if dt.kind == "i" else UNSIGNED[2 * dt.itemsize])
    if mode == "wide":
        d = D.dst(ins.operands[0], ("s" if dt.kind == "i" else "u") + str(16 * dt.itemsize))
        return lambda S: d(S, np.asarray(a(S)).astype(wide) * np.asarray(b(S)).astype(wide))
    d = D.dst(ins.operands[0], t)
    bits = np.uint64(8 * dt.itemsize) if dt.kind == "u" else np.int64(8 * dt.itemsize)
    return lambda S: d(S, ((np.asarray(a(S)).astype(wide) * np.asarray(b(S)).astype(wide)) >> bits).astype(dt))


@op("mad", "fma")
def _mad(D, ins, parts):
    t = parts[-1]
    dt = np.dtype(DT[t])
    a, b, c = (D.src(x, t) for x in ins.operands[1:4])
    if dt.kind == "f":  # one rounding of the exact product's sum, as far as float64 allows
        d = D.dst(ins.operands[0], t)
        if dt == np.float64:
            return lambda S: d(S, a(S) * b(S) + c(S))
        return lambda S: d(S, (np.float64(1) * a(S) * b(S) + c(S)).astype(dt))
    if parts[1] == "wide":
        wt = ("s" if dt.kind == "i" else "u") + str(16 * dt.itemsize)
        d, c = D.dst(ins.operands[0], wt), D.src(ins.operands[3], wt)
        w = np.dtype(DT[wt])
        return lambda S: d(S, np.asarray(a(S)).astype(w) * np.asarray(b(S)).astype(w) + c(S))
    if parts[1] != "lo" or "cc" in parts:
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} is not emulated")
    d = D.dst(ins.operands[0], t)
    return lambda S: d(S, np.multiply(a(S), b(S), dtype=dt) + c(S))


@op("neg", "abs", "not", "ex2", "rcp", "rsqrt", "sqrt", "lg2", "sin", "cos", "clz", "popc", "brev")
def _unary(D, ins, parts):
    base, t = parts[0], parts[-1]
    d, a = D.dst(ins.operands[0], t), D.src(ins.operands[1], t)
    dt = np.dtype(DT[t])
    if base == "clz":
        d = D.dst(ins.operands[0], "u32")
        bits = 8 * dt.itemsize

        def clz(x):
            x = np.asarray(x).astype(np.uint64)
            n = np.zeros(x.shape, np.uint32)
            for k in range(bits):
                n += (x >> np.uint64(bits - 1 - k)) == 0
                x = np.where((x >> np.uint64(bits - 1 - k)) == 0, x, np.uint64(0))
            return np.where(n > bits, bits, n)

        return lambda S: d(S, clz(a(S)))
    f = {
        "neg": np.negative, "abs": np.abs, "ex2": np.exp2, "rcp": np.reciprocal, "sqrt": np.sqrt, "lg2": np.log2,
        "rsqrt": lambda x: np.reciprocal(np.sqrt(x)), "sin": np.sin, "cos": np.cos,
        "not": np.logical_not if dt.kind == "b" else np.invert,
    }.get(base)  # fmt: skip
    if f is None:
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} is not emulated")
    return lambda S: d(S, f(a(S)).astype(dt))


@op("mov")
def _mov(D, ins, parts):
    t = parts[-1]
    dst, src = ins.operands
    if src.startswith("{"):  # pack: the first register is the low part
        pieces = D.vec(src)
        pt = f"b{8 * type_bytes(t) // len(pieces)}"
        readers = [D.src(p, pt) for p in pieces]
        d = D.dst(dst, t)
        ut = np.dtype(DT[f"b{8 * type_bytes(t)}"])
        w = np.uint64(8 * type_bytes(t) // len(pieces))

        def pack(S):
            acc = np.zeros(S.n, ut)
            for k, r in enumerate(readers):
                acc |= np.asarray(r(S)).astype(ut) << (w * np.uint64(k)).astype(ut)
            d(S, acc.view(DT[t]))

        return pack
    if dst.startswith("{"):
        pieces = D.vec(dst)
        bits = 8 * type_bytes(t) // len(pieces)
        writers = [D.dst(p, f"b{bits}") for p in pieces]
        a = D.src(src, f"b{8 * type_bytes(t)}")
        pdt = np.dtype(DT[f"b{bits}"])

        def unpack(S):
            v = _full(S, a(S), DT[f"b{8 * type_bytes(t)}"])
            for k, w in enumerate(writers):
                w(S, (v >> v.dtype.type(bits * k)).astype(pdt))

        return unpack
    d, a = D.dst(dst, t), D.src(src, t)
    return lambda S: d(S, a(S))


@op("cvta")
def _cvta(D, ins, parts):
    if "to" not in parts or parts[2] != "global":
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} (generic shared/local addresses) is not emulated")
    d, a = D.dst(ins.operands[0], parts[-1]), D.src(ins.operands[1], parts[-1])
    return lambda S: d(S, a(S))


@op("shl", "shr")
def _shift(D, ins, parts):
    base, t = parts[0], parts[-1]
    dt = np.dtype(DT[t])
    d, a, b = D.dst(ins.operands[0], t), D.src(ins.operands[1], t), D.src(ins.operands[2], "u32")
    bits = 8 * dt.itemsize

    def shift(S):
        x, n = np.asarray(a(S)), np.minimum(np.asarray(b(S)), bits).astype(np.int64)
        big = n >= bits
        n = np.where(big, 0, n).astype(dt)
        if base == "shl":
            r = np.where(big, dt.type(0), np.left_shift(x, n, dtype=dt))
        else:
            fill = np.where(x < 0, dt.type(-1), dt.type(0)) if dt.kind == "i" else dt.type(0)
            r = np.where(big, fill, np.right_shift(x, n, dtype=dt))
        d(S, r)

    return shift


_CMP = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal,
}  # fmt: skip


@op("setp")
def _setp(D, ins, parts):
    cmp, t = parts[1], parts[-1]
    a, b = D.src(ins.operands[1], t), D.src(ins.operands[2], t)
    outs = ins.operands[0].split("|")
    d = D.dst(outs[0], "pred")
    dq = D.dst(outs[1], "pred") if len(outs) > 1 else None
    if parts[2] in ("and", "or", "xor"):
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} (combined predicates) is not emulated")
    unordered = cmp.endswith("u") and cmp not in ("equ",) or cmp == "equ"
    base = cmp[:-1] if cmp.endswith("u") and len(cmp) == 3 else cmp
    if cmp in ("num", "nan"):
        f = (lambda x, y: ~(np.isnan(x) | np.isnan(y))) if cmp == "num" else (lambda x, y: np.isnan(x) | np.isnan(y))
    elif unordered and len(cmp) == 3:
        g = _CMP[base]

        def f(x, y):
            return g(x, y) | np.isnan(x) | np.isnan(y)
    else:
        f = _CMP[cmp]

    def setp(S):
        with np.errstate(invalid="ignore"):
            r = f(a(S), b(S))
        d(S, r)
        if dq is not None:
            dq(S, np.logical_not(r))

    return setp


@op("selp")
def _selp(D, ins, parts):
    t = parts[-1]
    d, a, b = D.dst(ins.operands[0], t), D.src(ins.operands[1], t), D.src(ins.operands[2], t)
    c = D.src(ins.operands[3], "pred")
    return lambda S: d(S, np.where(c(S), a(S), b(S)))


_FLOAT_ROUND = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil}


@op("cvt")
def _cvt(D, ins, parts):
    dt_name, st_name = parts[-2], parts[-1]
    if dt_name == "f16x2":  # cvt.rn.f16x2.f32 d, a, b: a to the high half, b to the low
        d = D.dst(ins.operands[0], "b32")
        hi, lo = D.src(ins.operands[1], "f32"), D.src(ins.operands[2], "f32")

        def pack(S):
            h = np.asarray(hi(S)).astype(np.float16).view(np.uint16).astype(np.uint32)
            low = np.asarray(lo(S)).astype(np.float16).view(np.uint16).astype(np.uint32)
            d(S, (h << np.uint32(16)) | low)

        return pack
    d, a = D.dst(ins.operands[0], dt_name), D.src(ins.operands[1], st_name)
    ddt, sdt = np.dtype(DT[dt_name]), np.dtype(DT[st_name])
    rnd = next((p for p in parts[1:-2] if p in _FLOAT_ROUND or p in ("rn", "rz", "rm", "rp")), None)
    if ddt.kind == "f" and sdt.kind == "f":
        if rnd in _FLOAT_ROUND:
            f = _FLOAT_ROUND[rnd]
            return lambda S: d(S, f(a(S)).astype(ddt))
        if rnd not in (None, "rn"):
            raise EmulatorError(f"{D.fn.name}: {ins.opcode} (directed rounding) is not emulated")
        return lambda S: d(S, np.asarray(a(S)).astype(ddt))
    if ddt.kind in "iu" and sdt.kind == "f":
        f = _FLOAT_ROUND.get(rnd or "rzi", np.trunc)
        info = np.iinfo(ddt)

        def to_int(S):
            x = np.asarray(a(S)).astype(np.float64)
            with np.errstate(invalid="ignore"):
                r = np.clip(np.nan_to_num(f(x), nan=0.0), info.min, info.max)
            d(S, r.astype(ddt))

        return to_int
    return lambda S: d(S, np.asarray(a(S)).astype(ddt))


@op("bfi")
def _bfi(D, ins, parts):
    t = parts[-1]
    d, a, b = D.dst(ins.operands[0], t), D.src(ins.operands[1], t), D.src(ins.operands[2], t)
    c, e = D.src(ins.operands[3], "u32"), D.src(ins.operands[4], "u32")

    def bfi(S):
        pos, length = np.asarray(c(S)).astype(np.uint64) & 0xFF, np.asarray(e(S)).astype(np.uint64) & 0xFF
        field = ((np.uint64(1) << length) - np.uint64(1)) << pos
        x = np.asarray(a(S)).astype(np.uint64) << pos
        r = (np.asarray(b(S)).astype(np.uint64) & ~field) | (x & field)
        d(S, r.astype(DT[t]))

    return bfi


@op("prmt")
def _prmt(D, ins, parts):
    if len(parts) > 2:
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} (prmt modes) is not emulated")
    d, a, b, c = (D.dst(ins.operands[0], "b32"), *(D.src(x, "b32") for x in ins.operands[1:4]))

    def prmt(S):
        src = (np.asarray(b(S)).astype(np.uint64) << np.uint64(32)) | np.asarray(a(S)).astype(np.uint64)
        sel = np.asarray(c(S)).astype(np.uint64)
        out = np.zeros(np.broadcast(src, sel).shape, np.uint64)
        for k in range(4):
            s = (sel >> np.uint64(4 * k)) & np.uint64(0xF)
            byte = (src >> ((s & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
            byte = np.where(s & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
            out |= byte << np.uint64(8 * k)
        d(S, out.astype(np.uint32))

    return prmt


@op("dp4a")
def _dp4a(D, ins, parts):
    ta, tb = parts[1], parts[2]
    d = D.dst(ins.operands[0], "s32" if "s32" in (ta, tb) else "u32")
    a, b = D.src(ins.operands[1], "b32"), D.src(ins.operands[2], "b32")
    c = D.src(ins.operands[3], "s32" if "s32" in (ta, tb) else "u32")
    bt = {"s32": np.int8, "u32": np.uint8}

    def dp4a(S):
        x = _full(S, a(S), np.uint32).view(np.uint8).reshape(-1, 4).view(bt[ta]).astype(np.int64)
        y = _full(S, b(S), np.uint32).view(np.uint8).reshape(-1, 4).view(bt[tb]).astype(np.int64)
        out = (x * y).sum(axis=1) + np.asarray(c(S)).astype(np.int64)
        d(S, out.astype(np.int32 if "s32" in (ta, tb) else np.uint32))

    return dp4a


# -- memory ------------------------------------------------------------------------------------------


def _space(parts):
    for s in ("global", "shared", "local", "param", "const"):
        if s in parts:
            return s
    return "generic"


@op("ld", "st")
def _ldst(D, ins, parts):
    space, t = _space(parts), parts[-1]
    n = int(next((p[1:] for p in parts if re.fullmatch(r"v\d", p)), 1))
    size = type_bytes(t)
    dt = np.dtype(DT[t])
    load = parts[0] == "ld"
    regs = D.vec(ins.operands[0] if load else ins.operands[1])
    addr_op = ins.operands[1] if load else ins.operands[0]
    if space == "param":
        name = re.match(r"\[([$\w]+)", addr_op).group(1)
        if not load or name not in D.params:
            return _unsupported(D, ins, "parameters of a called function (calls are not emulated)")
        off = D.params[name] + int(re.search(r"\+(\d+)", addr_op).group(1) if "+" in addr_op else 0)
        d = D.dst(regs[0], t)
        return lambda S: d(S, np.frombuffer(S.params, dt, 1, off)[0])
    if space not in ("global", "shared", "const"):
        return _unsupported(D, ins, f"{space} memory")
    addr = D.address(addr_op)
    what = "read" if load else "write"
    if load:
        writers = [D.dst(r, t) for r in regs]
    else:
        readers = [D.src(r, t) for r in regs]

    def access(S):
        lanes = S.lanes
        a = _at(addr(S), lanes)
        if space == "shared":
            offs = S.smem.check(a, size * n, S.block[lanes], lanes, S.kernel, what)
            mem = S.smem.data
        else:
            offs = S.gmem.check(a, size * n, lanes, S.kernel, what)
            mem = S.gmem.data
        view = mem.view(dt)
        first = offs // size
        if load:
            if space == "shared":
                S.smem.on_read(offs, size * n, S.thread[lanes], S.interval[S.block[lanes]], S.kernel)
            for k, w in enumerate(writers):
                v = np.zeros(S.n, dt)
                v[lanes] = view[first + k]
                w(S, v)
        else:
            if space == "shared":
                S.smem.on_write(offs, size * n, S.thread[lanes], S.interval[S.block[lanes]], S.kernel)
            for k, r in enumerate(readers):
                view[first + k] = _at(r(S), lanes)

    return access


def _unsupported(D, ins, why):
    def fail(S):
        raise EmulatorError(f"{S.kernel}: {ins.opcode} ({why}) is not emulated: {ins.line}")

    return fail


# -- warp operations -----------------------------------------------------------------------------------


def _warp_check(S, lanes, member, what):
    """Every active lane is in the member mask, and every member lane of its warp is active here."""
    lane = S.lane[lanes]
    base = lanes - lane
    if S.bsize % 32:
        raise EmulatorError(f"{S.kernel}: {what} in a block of {S.bsize} threads (not whole warps)")
    bits = _at(member, lanes).astype(np.uint64)
    if not ((bits >> lane.astype(np.uint64)) & np.uint64(1)).all():
        raise SanitizerError(f"{S.kernel}: {what} by lanes outside its member mask")
    k = np.arange(32)
    active = S.mask[base[:, None] + k]
    named = ((bits[:, None] >> k.astype(np.uint64)) & np.uint64(1)).astype(bool)
    missing = named & ~active
    if missing.any():
        row = np.nonzero(missing.any(axis=1))[0][0]
        raise SanitizerError(
            f"{S.kernel}: {what} with member mask 0x{int(bits[row]):08x} reached by only some lanes of the warp "
            f"of thread {int(S.thread[lanes[row]])}: missing {lanes_text(base[row] + np.nonzero(missing[row])[0])}"
        )
    return lane, base


@op("shfl")
def _shfl(D, ins, parts):
    mode, t = parts[2], parts[-1]
    outs = ins.operands[0].split("|")
    d = D.dst(outs[0], t)
    dp = D.dst(outs[1], "pred") if len(outs) > 1 else None
    a, b, c, m = (D.src(x, "b32") for x in ins.operands[1:5])

    def shfl(S):
        lanes = S.lanes
        lane, base = _warp_check(S, lanes, m(S), "shfl.sync")
        lane = lane.astype(np.int64)
        bv = _at(b(S), lanes).astype(np.int64) & 31
        cv = _at(c(S), lanes).astype(np.int64)
        seg, clamp = (cv >> 8) & 31, cv & 31
        max_lane = (lane & seg) | (clamp & ~seg)
        min_lane = lane & seg
        if mode == "up":
            j = lane - bv
            ok = j >= max_lane
        elif mode == "down":
            j, ok = lane + bv, None
            ok = j <= max_lane
        elif mode == "bfly":
            j = lane ^ bv
            ok = j <= max_lane
        else:
            j = min_lane | (bv & ~seg)
            ok = j <= max_lane
        j = np.where(ok, j, lane)
        src = base + j
        if not S.mask[src].all():
            bad = ~S.mask[src]
            raise SanitizerError(f"{S.kernel}: shfl.sync reads inactive lanes {lanes_text(src[bad])}")
        v = np.zeros(S.n, np.uint32)
        v[lanes] = _full(S, a(S), np.uint32)[src]
        d(S, v.view(DT[t]))
        if dp is not None:
            p = np.zeros(S.n, bool)
            p[lanes] = ok
            dp(S, p)

    return shfl


@op("vote")
def _vote(D, ins, parts):
    mode = parts[2]
    pv = ins.operands[1]
    neg = pv.startswith("!")
    p, m = D.src(pv.lstrip("!"), "pred"), D.src(ins.operands[2], "b32")
    d = D.dst(ins.operands[0], "b32" if mode == "ballot" else "pred")

    def vote(S):
        lanes = S.lanes
        lane, base = _warp_check(S, lanes, m(S), "vote.sync")
        pred = np.broadcast_to(p(S), (S.n,)) ^ neg
        bits = np.zeros(S.n, np.uint64)
        bits[lanes] = pred[lanes].astype(np.uint64) << lane.astype(np.uint64)
        ballot = bits.reshape(-1, 32).sum(axis=1).astype(np.uint32)
        mine = ballot[lanes // 32]
        member = _at(m(S), lanes).astype(np.uint32)
        out = np.zeros(S.n, np.uint32 if mode == "ballot" else bool)
        if mode == "ballot":
            out[lanes] = mine
        elif mode == "all":
            out[lanes] = (mine & member) == member
        elif mode == "any":
            out[lanes] = (mine & member) != 0
        else:
            out[lanes] = ((mine & member) == 0) | ((mine & member) == member)
        d(S, out)

    return vote


# WMMA fragments (their layout is the emulator's own: PTX leaves it unspecified): a lane l of an a or b
# fragment holds 16 halves (row l % 16 of A, or column l % 16 of B), two per register; an accumulator
# fragment lane l holds row l // 2, columns 8 (l % 2) .. +7 of the 16 x 16 tile, one per register.


def _wmma_offsets(S, lanes, addr, stride, which, layout, elem):
    a = _at(addr(S), lanes)
    ld = _at(stride(S), lanes).astype(np.int64)
    lane = S.lane[lanes].astype(np.int64)
    if which == "d":
        r, c = (lane // 2)[:, None], ((lane % 2) * 8)[:, None] + np.arange(8)
    elif which == "a":
        r, c = (lane % 16)[:, None], np.arange(16)[None, :]
    else:  # b: column n = lane % 16, rows k = 0..15
        r, c = np.arange(16)[None, :], (lane % 16)[:, None]
    idx = r * ld[:, None] + c if layout == "row" else c * ld[:, None] + r
    return a[:, None] + idx * elem


@op("wmma")
def _wmma(D, ins, parts):
    what = parts[1]
    if "m16n16k16" not in parts:
        raise EmulatorError(f"{D.fn.name}: {ins.opcode} (only m16n16k16 is emulated)")
    if what == "load":
        which, layout, t = parts[2], parts[5], parts[-1]
        regs = D.vec(ins.operands[0])
        writers = [D.dst(r, "b32" if t == "f16" else t) for r in regs]
        addr, stride = D.address(ins.operands[1]), D.src(ins.operands[2], "u32")
        elem = type_bytes(t)

        def load(S):
            lanes = S.lanes
            _warp_check(S, lanes, np.uint32(0xFFFFFFFF), ins.opcode)
            offs = _wmma_offsets(S, lanes, addr, stride, which, layout, elem).reshape(-1)
            blocks = np.repeat(S.block[lanes], offs.size // len(lanes))
            flat = S.smem.check(offs, elem, blocks, np.repeat(lanes, offs.size // len(lanes)), S.kernel, "read")
            S.smem.on_read(
                flat, elem, np.repeat(S.thread[lanes], offs.size // len(lanes)), S.interval[blocks], S.kernel
            )
            vals = S.smem.data.view(DT[t])[flat // elem].reshape(len(lanes), -1)
            per = vals.view(np.uint32) if t == "f16" else vals
            for k, w in enumerate(writers):
                v = np.zeros(S.n, per.dtype)
                v[lanes] = per[:, k]
                w(S, v)

        return load
    if what == "store":
        layout, t = parts[5], parts[-1]
        addr, stride = D.address(ins.operands[0]), D.src(ins.operands[2], "u32")
        readers = [D.src(r, t) for r in D.vec(ins.operands[1])]

        def store(S):
            lanes = S.lanes
            _warp_check(S, lanes, np.uint32(0xFFFFFFFF), ins.opcode)
            offs = _wmma_offsets(S, lanes, addr, stride, "d", layout, 4).reshape(-1)
            blocks = np.repeat(S.block[lanes], 8)
            flat = S.smem.check(offs, 4, blocks, np.repeat(lanes, 8), S.kernel, "write")
            S.smem.on_write(flat, 4, np.repeat(S.thread[lanes], 8), S.interval[blocks], S.kernel)
            vals = np.stack([_at(r(S), lanes) for r in readers], axis=1)
            S.smem.data.view(np.float32)[flat // 4] = vals.reshape(-1)

        return store
    if what == "mma":
        if parts[-2:] != ["f32", "f32"]:
            raise EmulatorError(f"{D.fn.name}: {ins.opcode} (only f16 inputs, f32 sums) is not emulated")
        dregs, aregs, bregs, cregs = (D.vec(x) for x in ins.operands)
        writers = [D.dst(r, "f32") for r in dregs]
        ra, rb = [D.src(r, "b32") for r in aregs], [D.src(r, "b32") for r in bregs]
        rc = [D.src(r, "f32") for r in cregs]

        def halves(S, lanes, readers):  # (warps, 16 lanes, 16 values)
            v = np.stack([_at(r(S), lanes) for r in readers], axis=1)
            return v.view(np.float16).astype(np.float32).reshape(-1, 32, 16)[:, :16]

        def mma(S):
            lanes = S.lanes
            _warp_check(S, lanes, np.uint32(0xFFFFFFFF), ins.opcode)
            a = halves(S, lanes, ra)  # [w, row, k]
            b = halves(S, lanes, rb)  # [w, col, k]
            c = np.stack([_at(r(S), lanes) for r in rc], axis=1).reshape(-1, 16, 16)
            out = (np.einsum("wrk,wck->wrc", a.astype(np.float64), b.astype(np.float64)) + c).astype(np.float32)
            out = out.reshape(-1, 8)
            for k, w in enumerate(writers):
                v = np.zeros(S.n, np.float32)
                v[lanes] = out[:, k]
                w(S, v)

        return mma
    raise EmulatorError(f"{D.fn.name}: {ins.opcode} is not emulated")


# -- control -------------------------------------------------------------------------------------------


def decode(fn: Function, module_symbols: dict[str, int], shared: dict[str, int]) -> tuple[list[Op], Decoder]:
    D = Decoder(fn, module_symbols, shared)
    ops = []
    for ins in fn.body:
        guard, negate = None, False
        if ins.guard:
            negate = ins.guard.startswith("!")
            guard = D.index[ins.guard.lstrip("!")]
        parts = ins.opcode.split(".")
        base = parts[0]
        if base == "bra":
            target = ins.operands[0]
            if target not in fn.labels:
                raise EmulatorError(f"{fn.name}: branch to unknown label {target}")
            ops.append(Op(BRANCH, fn.labels[target], guard, negate, ins))
        elif base in ("ret", "exit"):
            ops.append(Op(EXIT, None, guard, negate, ins))
        elif base in ("bar", "barrier"):
            if parts[1] not in ("sync", "") or ins.operands[0] != "0" or len(ins.operands) > 1:
                raise EmulatorError(f"{fn.name}: {ins.opcode} {ins.operands} (only bar.sync 0) is not emulated")
            ops.append(Op(BARRIER, None, guard, negate, ins))
        elif base in ("call", "call.uni") or ins.opcode.startswith("call"):
            ops.append(Op(NORMAL, _unsupported(D, ins, "function calls"), guard, negate, ins))
        elif base in OPS:
            ops.append(Op(NORMAL, OPS[base](D, ins, parts), guard, negate, ins))
        else:
            raise EmulatorError(f"{fn.name}: unknown opcode {ins.opcode!r} in {ins.line!r}")
    return ops, D
