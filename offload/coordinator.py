"""The appliance's offloaded layers: plan them onto workers, stream through them, survive their loss.

The appliance runs layers [0, k) itself; this runs [k, n) on a chain of workers. It keeps each
session's hidden states at that boundary (one row per token, a few KB), so when a worker dies,
hangs, sends garbage or is revoked, it drops the worker, re-plans onto the others, replays those
rows into the new chain to rebuild its KV caches, and carries on: the client sees nothing. The
appliance's own share [0, k) is fixed by its budget at start-up; with too few workers left, a step
fails with OffloadError. A background thread re-probes dropped workers and takes them back when they
answer, and re-reads every worker's speed now and then.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import statistics
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from gguf import GGMLQuantizationType

from models.errors import ModelError
from models.llama import Llama, Session
from models.lora import LoraAdapter, wire_tensors
from models.store import ModelStore
from offload import offload_pb2 as pb
from offload.client import (
    DECODE_ROWS,
    ChainBroken,
    ChainSession,
    WorkerClient,
    WorkerRefused,
    layer_manifest,
    no_revocations,
)
from offload.ledger import Ledger, LedgerError
from offload.pki import Identity
from offload.planner import Device, NoPlacementError, Plan, local_layers, make_plan
from offload.wire import tensor_spec

REPLAY_ROWS = 512  # rows per message when rebuilding a chain's caches
SLOWDOWN = 3.0  # a worker this many times slower than its own usual pace ...
SLOW_STEPS = 3  # ... on this many tokens in a row has slowed down: re-plan with its new speed
BARRED_S = 600.0  # a worker that sent malformed tensors is not probed again for this long


class OffloadError(ModelError):
    """No placement can run the model right now; the message says why."""


@dataclass
class RemoteState:
    """What a session needs on the workers: its chain, and its boundary rows for replay."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    inputs: list[np.ndarray] = field(default_factory=list)
    length: int = 0  # positions the workers' caches hold for it (the rows of inputs)
    round_trips: int = 0  # steps sent through the chain (not counting replays)
    chain: ChainSession | None = None
    generation: int = -1  # of the plan the chain was built for
    adapter: LoraAdapter | None = None  # the session's LoRA adapter: each hop gets its layers' part
    placement: list[tuple[str | None, int, int]] = field(default_factory=list)  # of its chain
    keep: int = 0  # positions the workers are to keep when it is released (the prefix cache)
    resume: Kept | None = None  # where its first positions are kept, until its chain is built


@dataclass
class Kept:
    """A released session's first positions, kept by its chain's workers (models/prefix_cache.py); its
    boundary rows too, for a replay into a chain that no longer holds them."""

    chain_id: str
    placement: list[tuple[str | None, int, int]]
    inputs: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes


@dataclass
class Usage:
    """What one worker has done for us: seconds computing offloaded layers, hidden-state bytes in."""

    name: str
    seconds: float = 0.0
    bytes: int = 0
    last_seen: float = 0.0  # wall-clock time of its last reply


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
        revoked: Callable[[], frozenset[int]] = no_revocations,
        wire_dtype: str = "float32",
        step_timeout_s: float = 10.0,
        appliance_ms_per_layer: float = 1.0,
        kv_tokens: int = 512,
    ):
        """revoked: the CA's revoked serials now, asked before every step (make it cheap: RevokedFile);
        kv_tokens: KV-cache room each placed layer keeps, counted against budgets with its weights.

        Budgets count what is really held: a layer's weights as the backend prepares them (the
        appliance's backend: float32 for NumPy), plus that KV room; the appliance's own part also
        holds the quantized embedding table, the final norm and the head."""
        self.model, self.identity, self.revoked = model, identity, revoked
        self.wire_dtype, self.step_timeout_s = wire_dtype, step_timeout_s
        self.layer_bytes = layer_costs(model, kv_tokens)
        self.fixed_bytes = model.fixed_nbytes
        self.appliance = Device("appliance", None, budget_bytes, appliance_ms_per_layer)
        self.owner = uuid.uuid4().hex  # names this coordinator's loads on workers
        self.workers: dict[str, tuple[WorkerClient, Device]] = {}
        self.known: set[str] = set()  # every worker address offered (named or discovered): re-probed when dropped
        self.barred: dict[str, float] = {}  # address -> until when it is not probed again (it sent garbage)
        self.paces: dict[tuple[str, int, int], Pace] = {}  # by worker, batch size and rows: more is slower
        self.slowdowns: dict[str, float] = {}  # by worker: how much slower than measured its pace has shown it
        self.usage: dict[str, Usage] = {}  # by worker address, for /metrics
        self.manifests: dict[tuple[int, int], list[pb.TensorSpec]] = {}
        self.adapter_parts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> range -> specs
        self.model_id = self._model_id()
        self.file_sha256 = ModelStore().sha256(model.file.path)  # workers holding this file read it themselves
        self.plan: Plan | None = None
        self.generation = 0  # bumped by any change of workers or of their costs: chains rebuild on it
        self.planned_generation = -1  # the generation self.plan was made and loaded for
        self.lock = threading.RLock()
        self.revoked_seen: frozenset[int] = frozenset()
        # Positions new chains took from workers' kept ones (the prefix cache), and rows replayed into chains.
        self.resumed_rows = self.replayed_rows = 0
        self.round_trips = 0  # steps through the chain, all sessions of a step together (for bench-offload)
        self.reprobes = 0  # upkeep passes over the dropped workers (/metrics: a test waits for one, not a sleep)
        self.overhead_ms: list[float] = []  # per decoded token: time on the wire and in gRPC, not computing
        self.discovery = None  # a zeroconf browser adding workers as they appear, if any
        self.stopping = threading.Event()
        self.speeds_due = True  # re-read every worker's speed at the next maintenance pass
        self.ledger: Ledger | None = None  # where the workers' signed statements of their compute go
        try:
            self.first_remote_layer = local_layers(self.layer_bytes, self.fixed_bytes, budget_bytes)
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
        """Check, measure and take on a worker; WorkerRefused if it may not be used (it stays known,
        so the background probe tries it again)."""
        self.known.add(address)
        client = WorkerClient(address, self.identity, self.revoked)
        try:
            caps = client.verify()
            link = client.measure_link()
        except WorkerRefused:
            client.close()
            raise
        except Exception as e:
            client.close()
            raise WorkerRefused(f"worker {address}: {e}") from e
        # Its whole budget: what our older plans left there is freed by the next plan's load, and
        # ranges nobody uses are evicted; a refusal anyway shrinks it (see current_plan).
        device = Device(
            caps.name, address, caps.memory_budget_bytes, self._ms_per_layer(caps), link.one_way_ms, link.bytes_per_ms
        )
        with self.lock:
            old = self.workers.get(address)
            self.workers[address] = (client, device)
            self.generation += 1
            self.speeds_due = True  # a device joining is when speeds measured together go wrong
        if old:
            old[0].close()
        return device

    def _ms_per_layer(self, caps: pb.Capabilities) -> float:
        return self._layer_flops() / max(caps.gflops, 1e-3) / 1e6

    def _layer_flops(self) -> float:
        c = self.model.config
        kv = c.n_kv_heads * c.head_dim
        return 2 * (2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim)

    def drop_worker(self, address: str) -> None:
        with self.lock:
            entry = self.workers.pop(address, None)
            self.paces = {key: pace for key, pace in self.paces.items() if key[0] != address}
            self.slowdowns.pop(address, None)
            self.generation += 1
        if entry:
            entry[0].close()

    # -- upkeep: dropped workers come back, speeds are re-read --------------------------------
    def start_upkeep(
        self, probe_every_s: float = 2.0, speeds_every_s: float = 300.0, ledger_every_s: float = 60.0
    ) -> None:
        """A daemon thread: re-probe dropped workers every probe_every_s; re-read speeds every speeds_every_s;
        put the workers' statements of their compute in the ledger every ledger_every_s."""

        def loop() -> None:
            last_speeds = last_ledger = time.monotonic()
            while not self.stopping.wait(probe_every_s):
                self.reprobe()
                if self.speeds_due or time.monotonic() - last_speeds > speeds_every_s:
                    self.refresh_speeds()
                    last_speeds = time.monotonic()
                if time.monotonic() - last_ledger > ledger_every_s:
                    self.record_contributions()
                    last_ledger = time.monotonic()

        threading.Thread(target=loop, name="offload-upkeep", daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        if self.discovery is not None:
            self.discovery.close()

    def record_contributions(self) -> list[dict]:
        """Ask each worker in use for its signed statement of the compute it did for us since its last
        one; append those with work in them to the ledger (a statement that does not verify is left out)."""
        added: list[dict] = []
        if self.ledger is None:
            return added
        with self.lock:
            workers = list(self.workers.values())
        for client, device in workers:
            try:
                statement = client.attest()
                fields = json.loads(statement.body)
                if fields.get("device") != device.name:
                    raise LedgerError(f"{device.name} sent a statement for {fields.get('device')!r}")
                if fields.get("compute_s") or fields.get("hidden_bytes"):
                    added.append(self.ledger.append(statement))
            except (grpc.RpcError, LedgerError, ValueError):  # it answers at the next pass, or never counts
                continue
        return added

    def reprobe(self) -> list[str]:
        """Try every known worker that is not in use; take back those that answer. Returns them."""
        self.reprobes += 1
        back = []
        now = time.monotonic()
        for address in sorted(self.known - set(self.workers)):
            if self.barred.get(address, 0.0) > now:
                continue
            try:
                self.add_worker(address)
                back.append(address)
            except WorkerRefused:
                pass
        return back

    def refresh_speeds(self) -> None:
        """Ask each worker its speed again (it re-measures when its figure is stale); re-plan if that moves layers."""
        self.speeds_due = False
        for address, (client, _) in list(self.workers.items()):
            try:
                caps = client.capabilities_now(timeout=2.0)
            except WorkerRefused:
                continue  # a step will find out whether it is gone
            with self.lock:
                if address in self.workers:
                    slowdown = self.slowdowns.get(address, 1.0)  # what its pace showed still holds
                    ms = self._ms_per_layer(caps) * slowdown
                    self._recost(address, lambda d, ms=ms: replace(d, ms_per_layer=ms))

    def _recost(self, address: str, change: Callable[[Device], Device]) -> None:
        """Change a worker's Device (under the lock); a new generation only if the best placement moves."""
        client, device = self.workers[address]
        self.workers[address] = (client, change(device))
        try:
            moved = self.plan is None or _placement(self.make_plan()) != _placement(self.plan)
        except OffloadError:
            moved = True
        if moved:
            self.generation += 1

    def _drop_revoked(self) -> None:
        """Between tokens: a worker whose certificate was revoked leaves the chain now; the others learn
        the new list at once (so the revoked one cannot reach them either)."""
        serials = self.revoked()
        if serials == self.revoked_seen:
            return
        self.revoked_seen = serials
        for address, (client, _) in list(self.workers.items()):
            if client.serial in serials:
                self.drop_worker(address)
        for client, _ in list(self.workers.values()):
            with contextlib.suppress(WorkerRefused):
                client.capabilities_now(timeout=2.0)

    def make_plan(self) -> Plan:
        devices = [d for _, d in self.workers.values()]
        try:
            return make_plan(self.layer_bytes, self.fixed_bytes, self.appliance, devices, self.hidden_bytes)
        except NoPlacementError as e:
            raise OffloadError(f"no placement can hold the model: {e}") from e

    def current_plan(self) -> tuple[Plan, int]:
        """The plan for the current set of workers, with its layers loaded on each of them. A load
        for a new generation frees, on that worker, what our older plans left there. A worker that
        refuses for memory anyway is planned with less; one that fails otherwise is dropped."""
        with self.lock:
            while self.planned_generation != self.generation:
                generation = self.generation
                plan = self.make_plan()
                for stage in plan.chain:
                    address = stage.device.address
                    client = self.workers[address][0]
                    try:
                        client.ensure_layers(
                            self.model, self.model_id, stage.start, stage.stop, self._manifest(stage),
                            self.owner, generation, self.file_sha256,
                        )  # fmt: skip
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # another appliance's sessions?
                            client, device = self.workers[address]
                            self.workers[address] = (client, replace(device, budget_bytes=stage.bytes - 1))
                            self.generation += 1
                        else:
                            self.drop_worker(address)
                        break
                    except Exception:  # noqa: BLE001  unreachable, closed channel, ...: not usable now
                        self.drop_worker(address)
                        break
                else:
                    self.plan, self.planned_generation = plan, generation
            return self.plan, self.planned_generation

    def _manifest(self, stage) -> list[pb.TensorSpec]:
        key = (stage.start, stage.stop)
        if key not in self.manifests:
            self.manifests[key] = layer_manifest(self.model, stage.start, stage.stop)
        return self.manifests[key]

    # -- running layers [first_remote_layer, n) --------------------------------------------
    def run(self, hiddens: list[np.ndarray], sessions: list[Session]) -> list[np.ndarray]:
        """Hidden states after the offloaded layers, for a batch of sessions (pipelined across them)."""
        self._drop_revoked()
        states = [self._state(s) for s in sessions]
        outs: list[np.ndarray | None] = [None] * len(hiddens)
        for _attempt in range(len(self.known) + 2):
            pending = [j for j, o in enumerate(outs) if o is None]
            if not pending:
                break
            try:
                plan, generation = self.current_plan()
            except OffloadError:
                if not self.reprobe():  # workers that came back since the last probe; else nothing to run on
                    raise
                plan, generation = self.current_plan()
            failed: list[tuple[int, ChainBroken]] = []
            sent = []
            for j in pending:
                try:
                    self._connect(states[j], plan, generation)
                    states[j].chain.send(hiddens[j], states[j].length)
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
            state.length += hidden.shape[0]
            state.round_trips += 1
        self.round_trips += 1  # the sessions of a step travel together
        return outs

    def rollback(self, session: Session, length: int) -> None:
        """Keep a session's first `length` positions: its replay rows are cut here, and each worker
        cuts its cache when the next message arrives saying it starts at `length` (no extra trip)."""
        state = session.remote
        if state is None or length >= state.length:
            return
        drop = state.length - length
        while drop:  # from the end: the refused drafts are the last rows sent
            last = state.inputs.pop()
            if last.shape[0] > drop:
                state.inputs.append(last[: last.shape[0] - drop])
                break
            drop -= last.shape[0]
        state.length = length

    def keep(self, session: Session, length: int) -> Kept | None:
        """The prefix cache's: at release, the session's workers keep its first `length` positions."""
        state = session.remote
        if not isinstance(state, RemoteState) or state.chain is None or not 0 < length <= state.length:
            return None
        state.keep = length
        return Kept(state.chain.session_id, state.placement, np.concatenate(state.inputs)[:length].copy())

    def resume(self, kept: Kept, length: int, session: Session) -> None:
        """A new session whose first `length` positions are those kept: its chain starts from them where
        every worker still holds them, else they are replayed from the rows."""
        session.remote = RemoteState(inputs=[kept.inputs[:length]], length=length, adapter=session.adapter, resume=kept)

    def _resumed(self, state: RemoteState, plan: Plan, chain_id: str, chain: list) -> bool:
        """Whether every worker of the new chain started chain_id from the kept positions."""
        kept, state.resume = state.resume, None
        if kept is None or kept.placement != _placement(plan):
            return False
        with futures.ThreadPoolExecutor(len(chain)) as pool:
            done = list(pool.map(lambda c: c[0].resume(chain_id, kept.chain_id, state.length, c[1]), chain))
        if all(done):
            self.resumed_rows += state.length
            return True
        for (worker, _), copied in zip(chain, done, strict=True):  # the replay starts those from nothing, too
            if copied:
                worker.release(chain_id)
        return False

    def _state(self, session: Session) -> RemoteState:
        if session.remote is None:
            session.remote = RemoteState(adapter=session.adapter)
        return session.remote

    def _adapter_part(self, client: WorkerClient, adapter: LoraAdapter | None, start: int, stop: int) -> list:
        """The adapter's tensors for layers [start, stop), pushed to the worker (its cache keeps them)."""
        if adapter is None:
            return []
        parts = self.adapter_parts.setdefault(adapter, {})
        if (start, stop) not in parts:  # hashed once per adapter and range
            arrays = wire_tensors(adapter, start, stop)
            specs = [tensor_spec(name, GGMLQuantizationType.F32, a.shape, a) for name, a in arrays.items()]
            parts[(start, stop)] = (specs, arrays)
        specs, arrays = parts[(start, stop)]
        if specs:
            try:
                client.push(specs, arrays)
            except grpc.RpcError as e:
                raise ChainBroken(
                    f"worker {client.address}: adapter not shipped: {e.code().name}", client.address
                ) from e
        return specs

    def _connect(self, state: RemoteState, plan: Plan, generation: int) -> None:
        """Make the session's chain match the plan, replaying its past rows into a new one."""
        if state.chain is not None and state.generation == generation:
            return
        self._disconnect(state)
        if not plan.chain:
            raise OffloadError("internal: a plan without workers does not offload")
        chain = []
        for s in plan.chain:
            entry = self.workers.get(s.device.address)
            if entry is None:
                raise ChainBroken(f"worker {s.device.address} was dropped")
            hop = pb.Hop(address=s.device.address, model_id=self.model_id, layer_start=s.start, layer_stop=s.stop)
            hop.adapter.extend(self._adapter_part(entry[0], state.adapter, s.start, s.stop))
            chain.append((entry[0], hop))
        chain_id = state.id + f"-{generation}"
        resumed = self._resumed(state, plan, chain_id, chain)
        state.chain = ChainSession(chain_id, chain, self.wire_dtype, self.model.config.dim, self.step_timeout_s)
        state.generation, state.placement = generation, _placement(plan)
        if state.inputs and not resumed:
            past = np.concatenate(state.inputs)
            for at in range(0, past.shape[0], REPLAY_ROWS):
                rows = past[at : at + REPLAY_ROWS]
                state.chain.send(rows, at)
                state.chain.receive(rows.shape[0])
            self.replayed_rows += past.shape[0]

    def _disconnect(self, state: RemoteState, keep: int = 0) -> None:
        if state.chain is not None:
            self.overhead_ms.extend(state.chain.overhead_ms)
            state.chain.close(keep)
            state.chain = None

    def _recover(self, plan: Plan, errors: list[ChainBroken]) -> None:
        """Drop the workers at fault: named ones, and any in the chain that no longer answers."""
        culprits = {e.culprit for e in errors if e.culprit}
        for address in culprits:
            self.barred[address] = time.monotonic() + BARRED_S
        for stage in plan.chain:
            address = stage.device.address
            if address in culprits or address in self.workers and not self.workers[address][0].healthy():
                self.drop_worker(address)
        with self.lock:
            self.generation += 1  # rebuild chains even if every worker still answers

    def _observe(self, plan: Plan, hop_ms: list[float], rows: int, batch: int) -> None:
        """Count each chain worker's time and bytes, and on decode steps (one token, or one and its
        drafts: a pace per row count) track its pace: one that has slowed down is re-costed, and if
        that changes the best placement, the next token runs on a new plan (its chain rebuilt by replay)."""
        for stage, ms in zip(plan.chain, hop_ms, strict=False):
            address = stage.device.address
            usage = self.usage.setdefault(address, Usage(stage.device.name))
            usage.seconds += ms / 1e3
            usage.bytes += rows * self.hidden_bytes
            usage.last_seen = time.time()
            if rows > DECODE_ROWS:
                continue
            factor = self.paces.setdefault((address, batch, rows), Pace()).add(ms / (stage.stop - stage.start))
            if factor is None:
                continue
            with self.lock:
                if address in self.workers:
                    self.slowdowns[address] = self.slowdowns.get(address, 1.0) * factor
                    self._recost(address, lambda d, f=factor: replace(d, ms_per_layer=d.ms_per_layer * f))

    def release(self, session: Session) -> None:
        if session.remote is not None:
            self._disconnect(session.remote, session.remote.keep)


def layer_costs(model: Llama, kv_tokens: int = 512) -> list[int]:
    """What each layer takes where it runs: its weights as the backend holds them, plus KV room for kv_tokens."""
    c = model.config
    kv = kv_tokens * 2 * c.n_kv_heads * c.head_dim * 4
    return [model.layer_nbytes(i) + kv for i in range(c.n_layers)]


def _placement(plan: Plan) -> list[tuple[str | None, int, int]]:
    return [(s.device.address, s.start, s.stop) for s in plan.chain]
