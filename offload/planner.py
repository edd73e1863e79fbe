"""Placement: which contiguous layers run where, so a token takes the least time within every budget.

The appliance keeps the embedding, final norm and LM head, and as many leading layers as its own
budget holds (a local layer costs no network hop). The rest form one chain of workers:

    appliance [0, k) -> worker 1 [k, m) -> worker 2 [m, n) -> appliance head

Predicted time per token = sum over devices of (layers x ms per layer)
                         + sum over the chain's N + 1 links of (one-way delay + bytes / bandwidth).

With few devices we try every subset of workers; within one, layers go to the fastest first, up to
each budget (optimal for a cost linear in layers). A chain hop between two workers is costed at
the larger of their delays from the appliance. So a device whose joining would raise the predicted
time per token (slow compute, a slow link: one more hop than it saves) is left out, unless the model
does not fit without it; the plan says, for every device, why it is in or out.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'40MB' -> 40_000_000; '2GiB' -> 2 * 2**30."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 40MB, 2GB, 512MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Device:
    name: str
    address: str | None  # None: the appliance itself
    budget_bytes: int
    ms_per_layer: float  # compute for one token through one layer
    one_way_ms: float = 0.0  # from the appliance
    bytes_per_ms: float = float("inf")  # link bandwidth


@dataclass
class Stage:
    device: Device
    start: int
    stop: int
    bytes: int


@dataclass
class Plan:
    local: Stage  # the appliance's leading layers (may be empty: start == stop)
    chain: list[Stage] = field(default_factory=list)
    ms_per_token: float = 0.0
    left_out: list[Device] = field(default_factory=list)  # workers offered but not in the chain
    why: dict[str, str] = field(default_factory=dict)  # by worker address: why it is in or out

    @property
    def stages(self) -> list[Stage]:
        return [self.local, *self.chain]


class NoPlacementError(Exception):
    """No placement holds the model within the devices' budgets; the message says by how much."""


def make_plan(
    layer_bytes: list[int], fixed_bytes: int, appliance: Device, workers: list[Device], hidden_bytes: int
) -> Plan:
    """The fastest placement; NoPlacementError when the budgets together cannot hold the model."""
    n = len(layer_bytes)
    k = local_layers(layer_bytes, fixed_bytes, appliance.budget_bytes)
    local = Stage(appliance, 0, k, sum(layer_bytes[:k]))
    local_ms = k * appliance.ms_per_layer
    if k == n:
        why = {d.address: "out: the appliance holds every layer" for d in workers}
        return Plan(local, [], local_ms, list(workers), why)
    candidates: list[Plan] = []
    for size in range(1, len(workers) + 1):
        for subset in itertools.combinations(workers, size):
            chain = _fill(layer_bytes, k, sorted(subset, key=lambda d: d.ms_per_layer))
            if chain is None:
                continue
            chain.sort(key=lambda s: s.start)
            ms = local_ms + sum((s.stop - s.start) * s.device.ms_per_layer for s in chain)
            ms += _links_ms([s.device for s in chain], hidden_bytes)
            candidates.append(Plan(local, chain, ms))
    if not candidates:
        offloaded = sum(layer_bytes[k:])
        room = sum(d.budget_bytes for d in workers)
        raise NoPlacementError(
            f"the model does not fit: {n - k} layers ({offloaded / 1e6:.1f} MB) need a place beyond the "
            f"appliance's budget, and the {len(workers)} reachable worker(s) offer {room / 1e6:.1f} MB in all"
        )
    best = min(candidates, key=lambda p: p.ms_per_token)  # the first of equals: the fewest workers
    best.left_out = [d for d in workers if all(s.device is not d for s in best.chain)]
    best.why = {d.address: _why(d, best, candidates) for d in workers}
    return best


def _why(device: Device, best: Plan, candidates: list[Plan]) -> str:
    """A worker's place in the best plan, against the best plan that leaves it out (or takes it in)."""

    def uses(plan: Plan) -> bool:
        return any(s.device is device for s in plan.chain)

    inside = uses(best)
    others = [p.ms_per_token for p in candidates if uses(p) != inside]
    if inside:
        stage = next(s for s in best.chain if s.device is device)
        why = f"in: layers [{stage.start}, {stage.stop}), {best.ms_per_token:.1f} ms/token predicted"
        return why + (f"; {min(others):.1f} without it" if others else "; the model does not fit without it")
    if not others:
        return "out: no placement that uses it holds the model within the budgets"
    return f"out: with it {min(others):.1f} ms/token predicted, {best.ms_per_token:.1f} without"


def local_layers(layer_bytes: list[int], fixed_bytes: int, budget: int) -> int:
    """How many leading layers the appliance keeps: all its budget holds after embedding and head."""
    if budget < fixed_bytes:
        raise NoPlacementError(
            f"a memory budget of {budget / 1e6:.1f} MB cannot hold the embedding and head "
            f"({fixed_bytes / 1e6:.1f} MB), which never leave the appliance"
        )
    return _fit(layer_bytes, 0, budget - fixed_bytes)


def _fit(layer_bytes: list[int], start: int, room: int) -> int:
    """The end of the longest run of layers from `start` that fits in `room` bytes."""
    end = start
    while end < len(layer_bytes) and layer_bytes[end] <= room:
        room -= layer_bytes[end]
        end += 1
    return end


def _fill(layer_bytes: list[int], start: int, fastest_first: list[Device]) -> list[Stage] | None:
    """Layers [start, n) onto these devices, fastest first, each up to its budget; every device used."""
    stages, at = [], start
    for d in fastest_first:
        end = _fit(layer_bytes, at, d.budget_bytes)
        if end == at:
            return None
        stages.append(Stage(d, at, end, sum(layer_bytes[at:end])))
        at = end
        if at == len(layer_bytes):
            break
    if at < len(layer_bytes) or len(stages) < len(fastest_first):
        return None
    return stages


def _links_ms(chain: list[Device], hidden_bytes: int) -> float:
    """appliance -> d1 -> ... -> dN -> appliance: N + 1 one-way trips of one token's hidden state."""
    ms, prev = 0.0, None
    for d in [*chain, None]:
        a, b = prev, d
        delay = max(x.one_way_ms for x in (a, b) if x is not None)
        bw = min(x.bytes_per_ms for x in (a, b) if x is not None)
        ms += delay + hidden_bytes / bw
        prev = d
    return ms


def describe(plan: Plan, n_layers: int) -> list[dict]:
    """One row per device for `appliance plan`."""
    rows = []
    for s in plan.stages:
        if s.stop == s.start and s.device.address is not None:
            continue
        rows.append(
            {
                "device": s.device.name,
                "address": s.device.address or "(this appliance)",
                "layers": f"[{s.start}, {s.stop})" if s.stop > s.start else "none",
                "bytes": s.bytes,
                "budget": s.device.budget_bytes,
                "ms/layer": s.device.ms_per_layer,
                "one-way ms": s.device.one_way_ms,
                "why": plan.why.get(s.device.address, "") if s.device.address else "its budget's layers, and the head",
            }
        )
    for d in plan.left_out:
        rows.append(
            {
                "device": d.name,
                "address": d.address,
                "layers": "none",
                "bytes": 0,
                "budget": d.budget_bytes,
                "ms/layer": d.ms_per_layer,
                "one-way ms": d.one_way_ms,
                "why": plan.why.get(d.address, ""),
            }
        )
    return rows
