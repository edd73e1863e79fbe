"""PTX text to kernels: parameters, register and shared declarations, labels and instructions.

Only the structure is read here; what an instruction does is the emulator's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_LABEL = re.compile(r"^([$\w]+):")
_ENTRY = re.compile(r"\.(entry|func)\s+(?:\([^)]*\)\s*)?([$\w]+)\s*\(([^)]*)\)")
_VAR = re.compile(
    r"(?:^|(?<=\s))(?:\.extern\s+)?\.(shared|global|const|local)\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([$\w]+)(?:\[(\d*)\])?"
    r"(?:\s*=\s*\{([^}]*)\})?"
)


class PtxError(RuntimeError):
    pass


@dataclass(frozen=True)
class Instruction:
    opcode: str  # e.g. "ld.global.nc.v4.f32"
    operands: tuple[str, ...]
    guard: str | None = None  # "%p1" or "!%p1"
    line: str = ""


@dataclass(frozen=True)
class Variable:
    space: str  # shared, global, const, local
    name: str
    type: str
    count: int | None  # elements; None for an extern array of unknown size (dynamic shared memory)
    align: int
    init: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return (self.count or 0) * type_bytes(self.type)


@dataclass
class Function:
    name: str
    entry: bool
    params: list[tuple[str, str, int]]  # (name, type, bytes)
    regs: dict[str, str] = field(default_factory=dict)  # register name -> declared type
    variables: list[Variable] = field(default_factory=list)  # .shared/.local declared in the body
    body: list[Instruction] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Module:
    functions: dict[str, Function]
    variables: list[Variable]  # module-level .global/.const/.extern .shared


def type_bytes(t: str) -> int:
    if t == "pred":
        return 1
    if t.endswith("x2"):
        return 4
    return int(re.sub(r"\D", "", t)) // 8


def split_operands(text: str) -> list[str]:
    """Commas at the top level only: '{%f1, %f2}, [%rd1+4]' is two operands."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _body_span(text: str, start: int) -> tuple[int, int]:
    """The braces of a function body from `start` (the first '{' after the header), nesting counted."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += text[j] == "{"
        depth -= text[j] == "}"
        if depth == 0:
            return i + 1, j
    raise PtxError("unbalanced braces in a function body")


def _params(text: str) -> list[tuple[str, str, int]]:
    out = []
    for p in split_operands(text):
        m = re.match(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+([$\w]+)(?:\[(\d+)\])?", p)
        if not m:
            raise PtxError(f"cannot read parameter {p!r}")
        size = type_bytes(m.group(1)) * (int(m.group(3)) if m.group(3) else 1)
        out.append((m.group(2), m.group(1), size))
    return out


def _variable(stmt: str) -> Variable | None:
    m = _VAR.search(stmt)
    if not m:
        return None
    space, align, typ, name, count, init = m.groups()
    n = None if count == "" else int(count) if count else 1
    values = tuple(int(v, 0) for v in init.split(",")) if init else ()
    return Variable(space, name, typ, n, int(align) if align else type_bytes(typ), values)


def _statements(body: str):
    """Statements between ';', with the labels in front of them and inline-asm scope braces removed."""
    for chunk in body.split(";"):
        s = chunk.strip()
        labels = []
        while True:
            if s.startswith(("{", "}")):
                s = s[1:].strip()
            elif m := _LABEL.match(s):
                labels.append(m.group(1))
                s = s[m.end() :].strip()
            else:
                break
        yield labels, " ".join(s.split())


def _function(kind: str, name: str, params: str, body: str) -> Function:
    fn = Function(name, kind == "entry", _params(params))
    for labels, s in _statements(body):
        for label in labels:
            fn.labels[label] = len(fn.body)
        if not s:
            continue
        if s.startswith(".reg"):
            m = re.match(r"\.reg\s+\.(\w+)\s+(.*)", s)
            for r in split_operands(m.group(2)):
                if rm := re.match(r"(%\w+)<(\d+)>", r):
                    fn.regs.update({f"{rm.group(1)}{i}": m.group(1) for i in range(int(rm.group(2)))})
                else:
                    fn.regs[r] = m.group(1)
            continue
        if s.startswith((".shared", ".local", ".global", ".const")):
            fn.variables.append(_variable(s))
            continue
        if s.startswith(".") or s.startswith("//"):
            continue  # .maxntid, .pragma and the like
        guard = None
        if s.startswith("@"):
            guard, s = s[1:].split(" ", 1)
        op, _, rest = s.partition(" ")
        if op == "call.uni" or op == "call":
            fn.body.append(Instruction(op, (rest,), guard, s))
            continue
        fn.body.append(Instruction(op, tuple(split_operands(rest)), guard, s))
    return fn


def parse(text: str) -> Module:
    text = _COMMENTS.sub("", text)
    functions, variables, pos = {}, [], 0
    while m := _ENTRY.search(text, pos):
        head = text[pos : m.start()]
        for stmt in head.split(";"):
            stmt = " ".join(stmt.replace("\n", " ").split())
            stmt = re.sub(r"^\.visible\s+|^\.weak\s+", "", stmt)
            if v := _variable(stmt):
                variables.append(v)
        # A declaration without a body (a prototype) ends in ';' before any '{'.
        after = text[m.end() :]
        semi, brace = after.find(";"), after.find("{")
        if brace < 0 or (0 <= semi < brace):
            pos = m.end() + semi + 1
            continue
        start, end = _body_span(text, m.end())
        functions[m.group(2)] = _function(m.group(1), m.group(2), m.group(3), text[start:end])
        pos = end + 1
    for stmt in text[pos:].split(";"):
        if v := _variable(" ".join(stmt.split())):
            variables.append(v)
    return Module(functions, variables)
