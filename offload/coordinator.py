"""The appliance's offloaded layers: plan them onto workers, stream through them, survive their loss.

The appliance runs layers [0, start) itself; this runs [start, n) on a chain of workers. It keeps
each session's hidden states at that boundary (one row per token, a few KB), so when a worker
dies, hangs or sends garbage, it drops the worker, re-plans onto the others (or itself), replays
those rows into the new chain to rebuild its KV caches, and carries on: the client sees nothing.
"""

from __future__ import annotations

import collections
import hashlib
import json
import statistics
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from models.errors import ModelError
from models.llama import Llama, Session
from offload import offload_pb2 as pb
from offload.client import ChainBroken, ChainSession, WorkerClient, WorkerRefused, layer_manifest
from offload.pki import Identity
from offload.planner import Device, NoPlacementError, Plan, local_layers, make_plan
from offload.worker import LAYER_PARTS

REPLAY_ROWS = 512  # rows per message when rebuilding a chain's caches
SLOWDOWN = 3.0  # a worker this many times slower than its own usual pace ...
SLOW_STEPS = 3  # ... on this many tokens in a row has slowed down: re-plan with its new speed


class OffloadError(ModelError):
    """No placement can run the model right now; the message says why."""


@dataclass
class RemoteState:
    """What a session needs on the workers: its chain, and its boundary rows for replay."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    inputs: list[np.ndarray] = field(default_factory=list)
    chain: ChainSession | None = None
    version: int = -1  # the plan the chain was built for


@dataclass
class Usage:
    """What one worker has done for us: seconds computing offloaded layers, hidden-state bytes in."""

    name: str
    seconds: float = 0.0
    bytes: int = 0


class Pace:
    """A worker's observed ms per layer on one-token steps: its usual pace, and whether it has slowed."""

    def __init__(self):
        self.usual: float | None = None
        self.recent: collections.deque[float] = collections.deque(maxlen=SLOW_STEPS)

    def add(self, ms_per_layer: float) -> float | None:
        """How many times slower the worker has become, once SLOW_STEPS steps in a row say so."""
        self.recent.append(ms_per_layer)
        if len(self.recent) < SLOW_STEPS:
            return None
        now = statistics.median(self.recent)
        if self.usual is None:
            self.usual = now
        elif min(self.recent) > SLOWDOWN * self.usual:
            factor, self.usual = now / self.usual, now
            return factor
        else:
            self.usual = min(self.usual, now)
        return None


class Coordinator:
    def __init__(
        self,
        model: Llama,
        budget_bytes: int,
        identity: Identity,
        revoked: Callable[[], set[int]] = frozenset,
        wire_dtype: str = "float32",
        step_timeout_s: float = 10.0,
        appliance_ms_per_layer: float = 1.0,
        kv_tokens: int = 512,
    ):
        """revoked: the CA's revoked serials, read at each join (the owner may revoke while we run);
        kv_tokens: KV-cache room each placed layer keeps, counted against budgets with its weights."""
        self.model, self.identity, self.revoked = model, identity, revoked
        self.wire_dtype, self.step_timeout_s = wire_dtype, step_timeout_s
        files = model.file.tensors
        n = model.config.n_layers
        c = model.config
        kv = kv_tokens * 2 * c.n_kv_heads * c.head_dim * 4
        self.layer_bytes = [sum(files[f"blk.{i}.{p}.weight"].raw.nbytes for p in LAYER_PARTS) + kv for i in range(n)]
        self.fixed_bytes = sum(t.raw.nbytes for name, t in files.items() if not name.startswith("blk."))
        self.appliance = Device("appliance", None, budget_bytes, appliance_ms_per_layer)
        self.workers: dict[str, tuple[WorkerClient, Device]] = {}
        self.paces: dict[tuple[str, int], Pace] = {}  # by worker and batch size: a bigger batch is slower
        self.usage: dict[str, Usage] = {}  # by worker address, for /metrics
        self.manifests: dict[tuple[int, int], list[pb.TensorSpec]] = {}
        self.model_id = self._model_id()
        self.plan: Plan | None = None
        self.version = 0
        self.lock = threading.RLock()
        self.plan_version = -1
        self.overhead_ms: list[float] = []  # per decoded token: time on the wire and in gRPC, not computing
        self.discovery = None  # a zeroconf browser adding workers as they appear, if any
        try:
            self.start = local_layers(self.layer_bytes, self.fixed_bytes, budget_bytes)  # [0, start) stay here
        except NoPlacementError as e:
            raise OffloadError(str(e)) from e

    def _model_id(self) -> str:
        config = json.dumps(self.model.config.__dict__, sort_keys=True).encode()
        return hashlib.sha256(config + self.model.file.path.name.encode() + str(self.layer_bytes).encode()).hexdigest()

    @property
    def hidden_bytes(self) -> int:
        return self.model.config.dim * (4 if self.wire_dtype == "float32" else 2)

    # -- devices ----------------------------------------------------------------------------
    def add_worker(self, address: str) -> Device:
        """Check, measure and take on a worker; WorkerRefused if it may not be used."""
        client = WorkerClient(address, self.identity, self.revoked())
        try:
            caps = client.verify()
            link = client.measure_link()
        except WorkerRefused:
            client.close()
            raise
        except Exception as e:
            client.close()
            raise WorkerRefused(f"worker {address}: {e}") from e
        ms_per_layer = self._layer_flops() / max(caps.gflops, 1e-3) / 1e6
        room = max(caps.memory_budget_bytes - caps.memory_used_bytes, 0)
        device = Device(caps.name, address, room, ms_per_layer, link.one_way_ms, link.bytes_per_ms)
        with self.lock:
            self.workers[address] = (client, device)
            self.version += 1
        return device

    def _layer_flops(self) -> float:
        c = self.model.config
        kv = c.n_kv_heads * c.head_dim
        return 2 * (2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim)

    def drop_worker(self, address: str) -> None:
        with self.lock:
            entry = self.workers.pop(address, None)
            self.paces = {key: pace for key, pace in self.paces.items() if key[0] != address}
            self.version += 1
        if entry:
            entry[0].close()

    def make_plan(self) -> Plan:
        devices = [d for _, d in self.workers.values()]
        try:
            return make_plan(self.layer_bytes, self.fixed_bytes, self.appliance, devices, self.hidden_bytes)
        except NoPlacementError as e:
            raise OffloadError(f"no placement can hold the model: {e}") from e

    def _current_plan(self) -> tuple[Plan, int]:
        """The plan for the current set of workers, with its layers loaded on each of them."""
        with self.lock:
            while self.plan_version != self.version:
                version = self.version
                plan = self.make_plan()
                failed = None
                for stage in plan.chain:
                    client = self.workers[stage.device.address][0]
                    try:
                        client.ensure_layers(self.model, self.model_id, stage.start, stage.stop, self._manifest(stage))
                    except Exception:
                        failed = stage.device.address
                        break
                if failed:
                    self.drop_worker(failed)
                    continue
                self.plan, self.plan_version = plan, version
            return self.plan, self.version

    def _manifest(self, stage) -> list[pb.TensorSpec]:
        key = (stage.start, stage.stop)
        if key not in self.manifests:
            self.manifests[key] = layer_manifest(self.model, stage.start, stage.stop)
        return self.manifests[key]

    # -- running layers [start, n) ---------------------------------------------------------
    def run(self, hiddens: list[np.ndarray], sessions: list[Session]) -> list[np.ndarray]:
        """Hidden states after the offloaded layers, for a batch of sessions (pipelined across them)."""
        states = [self._state(s) for s in sessions]
        outs: list[np.ndarray | None] = [None] * len(hiddens)
        for _attempt in range(len(self.workers) + 2):
            pending = [j for j, o in enumerate(outs) if o is None]
            if not pending:
                break
            plan, version = self._current_plan()
            failed: list[tuple[int, ChainBroken]] = []
            sent = []
            for j in pending:
                try:
                    self._connect(states[j], plan, version)
                    states[j].chain.send(hiddens[j])
                    sent.append(j)
                except ChainBroken as e:
                    failed.append((j, e))
            for j in sent:
                try:
                    outs[j] = states[j].chain.receive(hiddens[j].shape[0])
                except ChainBroken as e:
                    failed.append((j, e))
                    continue
                self._observe(plan, states[j].chain.hop_ms, hiddens[j].shape[0], len(sent))
            if failed:
                self._recover(plan, [e for _, e in failed])
                for j, _ in failed:
                    self._disconnect(states[j])
        if any(o is None for o in outs):
            raise OffloadError("the offloaded layers kept failing; no worker answered in time")
        for state, hidden in zip(states, hiddens, strict=True):
            state.inputs.append(hidden)
        return outs

    def _state(self, session: Session) -> RemoteState:
        if session.remote is None:
            session.remote = RemoteState()
        return session.remote

    def _connect(self, state: RemoteState, plan: Plan, version: int) -> None:
        """Make the session's chain match the plan, replaying its past rows into a new one."""
        if state.chain is not None and state.version == version:
            return
        self._disconnect(state)
        if not plan.chain:
            raise OffloadError("internal: a plan without workers does not offload")
        chain = [
            (
                self.workers[s.device.address][0],
                pb.Hop(address=s.device.address, model_id=self.model_id, layer_start=s.start, layer_stop=s.stop),
            )
            for s in plan.chain
        ]
        state.chain = ChainSession(
            state.id + f"-{version}", chain, self.wire_dtype, self.model.config.dim, self.step_timeout_s
        )
        state.version = version
        if state.inputs:
            past = np.concatenate(state.inputs)
            for at in range(0, past.shape[0], REPLAY_ROWS):
                rows = past[at : at + REPLAY_ROWS]
                state.chain.send(rows)
                state.chain.receive(rows.shape[0])

    def _disconnect(self, state: RemoteState) -> None:
        if state.chain is not None:
            self.overhead_ms.extend(state.chain.overhead_ms)
            state.chain.close()
            state.chain = None

    def _recover(self, plan: Plan, errors: list[ChainBroken]) -> None:
        """Drop the workers at fault: named ones, and any in the chain that no longer answers."""
        culprits = {e.culprit for e in errors if e.culprit}
        for stage in plan.chain:
            address = stage.device.address
            if address in culprits or address in self.workers and not self.workers[address][0].healthy():
                self.drop_worker(address)
        with self.lock:
            self.version += 1  # rebuild chains even if every worker still answers

    def _observe(self, plan: Plan, hop_ms: list[float], rows: int, batch: int) -> None:
        """Count each chain worker's time and bytes, and on one-token steps track its pace: one that has
        slowed down is re-costed, and if that changes the best placement, the next token runs on a new
        plan (its chain rebuilt by replay)."""
        for stage, ms in zip(plan.chain, hop_ms, strict=False):
            address = stage.device.address
            usage = self.usage.setdefault(address, Usage(stage.device.name))
            usage.seconds += ms / 1e3
            usage.bytes += rows * self.hidden_bytes
            if rows != 1:
                continue
            factor = self.paces.setdefault((address, batch), Pace()).add(ms / (stage.stop - stage.start))
            if factor is None:
                continue
            with self.lock:
                if address not in self.workers:
                    continue
                client, device = self.workers[address]
                self.workers[address] = (client, replace(device, ms_per_layer=device.ms_per_layer * factor))
                if _placement(self.make_plan()) != _placement(plan):
                    self.version += 1

    def release(self, session: Session) -> None:
        if session.remote is not None:
            self._disconnect(session.remote)


def _placement(plan: Plan) -> list[tuple[str | None, int, int]]:
    return [(s.device.address, s.start, s.stop) for s in plan.chain]
