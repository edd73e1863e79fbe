"""`appliance-worker`: runs layer ranges for the appliance on a LAN device, over mutual TLS.

It keeps shipped tensors in a disk cache named by their SHA-256 (a restart does not re-ship them),
holds any number of sessions' KV caches, frees a session when its stream ends, on release or when
idle, and counts against its memory budget what it really holds: weights as its backend prepared
them (float32 for NumPy) plus KV caches. A new plan's load frees what the appliance's older plans
left here, and ranges no session uses are evicted before a load is refused. Outputs go to the next
worker of the chain directly, or, from the last one, straight back to the appliance. A session released
with `keep` leaves its first positions behind (the prefix cache: the next turn of the chat Resumes from
them); those go first, least recently used first, whenever memory is wanted.
"""

from __future__ import annotations

import hashlib
import os
import queue
import statistics
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import typer
from gguf import GGMLQuantizationType

from kernels.backend import Backend, describe, select_backend
from models.errors import ModelError, UnsupportedModelError
from models.gguf_file import GGUFModelFile, open_gguf
from models.llama import KVCache, LayerRange, LayerWeights, LlamaConfig, held_nbytes, read_layer
from models.lora import AdapterError, LoraAdapter, from_wire
from models.store import ModelStore
from offload import offload_pb2 as pb
from offload import offload_pb2_grpc as rpc
from offload.ledger import Statement
from offload.pki import Identity, PairingError, certificate_name
from offload.planner import parse_size
from offload.protocol import CULPRIT_KEY, MESSAGE_OPTIONS, PROTOCOL, secure_channel
from offload.revocation import RevocationCheck, Revocations, is_appliance
from offload.wire import WIRE_DTYPES, MalformedTensor, decode, encode

GFLOPS_MAX_AGE_S = 30.0  # capabilities asked for later than this re-measure the speed first


class TensorCache:
    """Tensors on disk by content hash: written only once their bytes match the hash."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def has(self, sha256: str) -> bool:
        return (self.folder / sha256).is_file()

    def receive(self, chunks) -> int:
        """Store tensors from a stream of chunks; a tensor whose bytes do not match its hash is refused."""
        stored, current, digest, tmp = 0, None, None, None
        for chunk in chunks:
            if chunk.sha256 != current:
                if current is not None:
                    raise ValueError(f"tensor {current[:12]} ended without its last chunk")
                if len(chunk.sha256) != 64 or not all(c in "0123456789abcdef" for c in chunk.sha256):
                    raise ValueError("a tensor chunk must name its tensor by a lowercase hex SHA-256")
                current, digest = chunk.sha256, hashlib.sha256()
                tmp = open(self.folder / f".{current}.{os.getpid()}.part", "wb")  # noqa: SIM115
            digest.update(chunk.data)
            tmp.write(chunk.data)
            if chunk.last:
                tmp.close()
                if digest.hexdigest() != current:
                    os.unlink(tmp.name)
                    raise ValueError(f"tensor {current[:12]}: bytes do not match their SHA-256")
                os.replace(tmp.name, self.folder / current)
                stored, current = stored + 1, None
        if current is not None:
            tmp.close()
            os.unlink(tmp.name)
            raise ValueError(f"tensor {current[:12]} ended without its last chunk")
        return stored

    def read(self, spec: pb.TensorSpec) -> np.ndarray:
        return np.fromfile(self.folder / spec.sha256, dtype=np.uint8)


class ModelFiles:
    """Model files this worker holds itself (named by --model, or in its model store), by SHA-256: the
    layers of such a file are read from it, and the appliance ships nothing."""

    def __init__(self, paths: list[Path]):
        store = ModelStore()
        found = [*paths, *(sorted(store.root.glob("*.gguf")) if store.root.is_dir() else [])]
        self.files: dict[str, GGUFModelFile] = {}
        for path in found:
            try:
                self.files.setdefault(store.sha256(Path(path)), open_gguf(path))
            except (ModelError, OSError):
                continue  # a damaged or vanished file is simply not offered

    def tensor(self, file_sha256: str, spec: pb.TensorSpec) -> np.ndarray | None:
        """The raw bytes of a tensor of that file, if this worker holds it with that type and shape."""
        file = self.files.get(file_sha256)
        t = file.tensors.get(spec.name) if file is not None else None
        if t is None or int(t.qtype) != spec.ggml_type or [int(n) for n in t.shape] != list(spec.shape):
            return None
        return t.raw


@dataclass
class LoadedRange:
    layers: LayerRange
    nbytes: int  # its weights as the backend holds them
    owners: dict[str, int]  # each coordinator using it -> the plan generation it was loaded for


@dataclass
class WorkerSession:
    layers: LayerRange
    key: tuple[str, int, int]
    cache: KVCache
    dtype: str
    reply: bool  # outputs go back on the Forward stream (a one-worker chain) rather than onward
    downstream: Downstream | None = None
    adapter: LoraAdapter | None = None  # the session's LoRA adapter for these layers
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False  # released (or its range superseded) while its stream is still open


@dataclass
class Kept:
    """A released session's first positions on one layer range, for a session that starts the same way."""

    key: tuple[str, int, int]
    cache: KVCache
    at: float = field(default_factory=time.monotonic)  # when it was kept, or a resumed copy made


@dataclass
class StreamFailed:
    """How a session's Forward stream failed. The Results stream the appliance reads from the chain's
    last worker ends the same way: ending it cleanly would hide which worker was at fault."""

    code: grpc.StatusCode
    details: str
    metadata: tuple = ()


def _failure(context) -> StreamFailed | None:
    """The error this RPC was aborted with, if it was."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return None
    details = context.details() or b""  # grpc keeps it encoded
    details = details.decode(errors="replace") if isinstance(details, bytes) else details
    return StreamFailed(code, details, tuple(context.trailing_metadata() or ()))


class Downstream:
    """This worker's stream to the next worker of a chain, fed from a queue; its failure is reported."""

    def __init__(self, address: str, channel: grpc.Channel, header: pb.Activation, on_error: Callable):
        self.address, self.channel = address, channel
        self.header: pb.Activation | None = header  # the next hop's layers and the rest of the route
        self.outbox: queue.Queue = queue.Queue()
        call = rpc.OffloadStub(channel).Forward(iter(self.outbox.get, None))
        threading.Thread(target=self._drain, args=(call, on_error), daemon=True).start()

    def _drain(self, call, on_error: Callable) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                on_error(e)

    def send(self, msg: pb.Activation) -> None:
        if self.header is not None:  # merged into the first message only
            msg.MergeFrom(self.header)
            self.header = None
        self.outbox.put(msg)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def _pump_requests(requests, inbox: queue.Queue) -> None:
    try:
        for msg in requests:
            inbox.put(msg)
    except Exception:  # noqa: BLE001  the caller went away: the stream ends as if closed
        pass
    inbox.put(None)


class WorkerService(rpc.OffloadServicer):
    def __init__(
        self,
        name: str,
        identity: Identity,
        home: Path,
        budget: int,
        backend: Backend,
        idle_s: float,
        models: list[Path] = (),
        keep_bytes: int = 256 << 20,
    ):
        self.name, self.identity, self.budget, self.backend, self.idle_s = name, identity, budget, backend, idle_s
        self.keep_bytes = keep_bytes  # the most released sessions' kept positions may hold
        self.tensors = TensorCache(home / "tensors")
        self.models = ModelFiles(list(models))
        self.revocations = Revocations(home / "revoked.json")  # what the appliance told us, kept on disk
        self.ranges: dict[tuple[str, int, int], LoadedRange] = {}  # by (model id, start, stop)
        self.sessions: dict[str, WorkerSession] = {}
        self.results: dict[str, queue.Queue] = {}
        self.adapters: dict[tuple[str, ...], LoraAdapter] = {}  # by the sha256s of their tensors
        self.kept: OrderedDict[str, Kept] = OrderedDict()  # by released session, least recently used first
        self.resumed: dict[str, Kept] = {}  # copies made by Resume, by the session whose stream takes them
        self.lock = threading.Lock()
        self.gflops, self.measured_at = measure_gflops(), time.monotonic()
        # What this device has done for the appliance since its last signed statement (the ledger).
        self.contributed = {"compute_s": 0.0, "hidden_bytes": 0}
        self.attested_at, self.attestations = time.time(), 0
        threading.Thread(target=self._reap_idle, daemon=True).start()

    # -- memory ------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Bytes held now: every loaded range's weights as the backend holds them, and every KV cache."""
        with self.lock:
            return self._held()

    def _held(self) -> int:  # with the lock
        kept = (*self.kept.values(), *self.resumed.values())
        caches = [s.cache for s in self.sessions.values()] + [k.cache for k in kept]
        return sum(r.nbytes for r in self.ranges.values()) + sum(c.nbytes for c in caches)

    def _forget_kept(self, need: int = 0) -> None:
        """Drop kept positions, least recently used first, beyond keep_bytes or until `need` more bytes fit."""
        with self.lock:
            while self.kept and (
                sum(k.cache.nbytes for k in self.kept.values()) > self.keep_bytes or self._held() + need > self.budget
            ):
                self.kept.popitem(last=False)

    def _supersede(self, owner: str, generation: int, keep: tuple[str, int, int]) -> None:
        """A load for `owner`'s plan `generation`: free the ranges it loaded for older plans (unless
        another owner still uses them) and close the sessions on those ranges."""
        closing = []
        with self.lock:
            for key, loaded in list(self.ranges.items()):
                if key != keep and loaded.owners.get(owner, generation) < generation:
                    del loaded.owners[owner]
                    if not loaded.owners:
                        del self.ranges[key]
                        closing += [sid for sid, s in self.sessions.items() if s.key == key]
                        for sid in [sid for sid, k in self.kept.items() if k.key == key]:
                            del self.kept[sid]
        for sid in closing:
            self._release(sid)

    def _evict_unused(self, need: int) -> None:
        """Drop kept positions, then loaded ranges no session uses, until `need` more bytes fit."""
        self._forget_kept(need)
        with self.lock:
            in_use = {s.key for s in self.sessions.values()}
            for key in [k for k in self.ranges if k not in in_use]:
                if self._held() + need <= self.budget:
                    break
                del self.ranges[key]

    # -- rpc ---------------------------------------------------------------------------------
    def GetCapabilities(self, request, context):
        if request.revoked_serials:
            if not is_appliance(context):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the appliance may revoke certificates")
            self.revocations.add(request.revoked_serials)
        if time.monotonic() - self.measured_at > GFLOPS_MAX_AGE_S:  # speeds change: a laptop throttles, a job starts
            self.gflops, self.measured_at = measure_gflops(), time.monotonic()
        return pb.Capabilities(
            protocol=PROTOCOL,
            name=self.name,
            backend=describe(self.backend),
            memory_budget_bytes=self.budget,
            memory_used_bytes=self.used,
            gflops=self.gflops,
            wire_dtypes=list(WIRE_DTYPES),
            model_files=sorted(self.models.files),
        )

    def MissingTensors(self, request, context):
        return pb.TensorHashes(sha256=[t.sha256 for t in request.tensors if not self._has(request.file_sha256, t)])

    def _has(self, file_sha256: str, spec: pb.TensorSpec) -> bool:
        return self.models.tensor(file_sha256, spec) is not None or self.tensors.has(spec.sha256)

    def _read(self, file_sha256: str, spec: pb.TensorSpec) -> np.ndarray:
        """A tensor's bytes: from this worker's own copy of the model file, else from what was shipped."""
        raw = self.models.tensor(file_sha256, spec)
        return self.tensors.read(spec) if raw is None else raw

    def PushTensors(self, request_iterator, context):
        try:
            return pb.PushReply(stored=self.tensors.receive(request_iterator))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def LoadLayers(self, request, context):
        key = (request.model_id, request.layer_start, request.layer_stop)
        self._supersede(request.owner, request.generation, keep=key)
        with self.lock:
            if key in self.ranges:
                self.ranges[key].owners[request.owner] = request.generation
                return pb.LoadReply(bytes=self.ranges[key].nbytes)
        specs = {t.name: t for t in request.manifest.tensors}
        try:
            need = sum(held_nbytes(self.backend, t.ggml_type, tuple(t.shape)) for t in specs.values())
        except (ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a tensor of this manifest has no known type: {e}")
        self._evict_unused(need)
        if self.used + need > self.budget:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"layers [{request.layer_start}, {request.layer_stop}) need {need / 1e6:.1f} MB; this worker's "
                f"budget is {self.budget / 1e6:.1f} MB with {self.used / 1e6:.1f} MB in use",
            )
        source = request.manifest.file_sha256
        missing = [t.name for t in specs.values() if not self._has(source, t)]
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"tensors not pushed yet: {', '.join(missing[:3])}")
        try:
            config = LlamaConfig.from_json(request.config_json)
            layers = [self._layer(config, i, specs, source) for i in range(request.layer_start, request.layer_stop)]
        except (TypeError, ValueError, KeyError, UnsupportedModelError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot build layers from this request: {e}")
        held = sum(w.nbytes for w in layers)
        with self.lock:
            layer_range = LayerRange(config, self.backend, request.layer_start, layers)
            self.ranges[key] = LoadedRange(layer_range, held, {request.owner: request.generation})
        return pb.LoadReply(bytes=held)

    def _layer(self, config: LlamaConfig, i: int, specs: dict[str, pb.TensorSpec], source: str) -> LayerWeights:
        """Layer i of the config's architecture from its tensors, read from `source` (a model file's
        SHA-256) when this worker holds that file, else as pushed (a missing one: KeyError)."""

        def weight(name: str):
            spec = specs[name]
            shape = tuple(int(n) for n in spec.shape)
            return self.backend.weight(self._read(source, spec), GGMLQuantizationType(spec.ggml_type), shape)

        return read_layer(config.spec, i, weight)

    def Forward(self, request_iterator, context):
        """Requests and the next hop's failure arrive in one inbox, so a failure downstream ends this
        stream at once, saying which worker is at fault, rather than at the next request."""
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_pump_requests, args=(request_iterator, inbox), daemon=True).start()
        session_id, session = None, None
        try:
            while (msg := inbox.get()) is not None:
                if isinstance(msg, grpc.RpcError):
                    self._downstream_failed(context, msg, getattr(session.downstream, "address", "next worker"))
                if session is None:
                    session_id, session = msg.session_id, self._open(msg, context, inbox)
                if session.closed:
                    context.abort(grpc.StatusCode.ABORTED, f"session {session_id} was released or its plan superseded")
                try:
                    x = decode(msg, session.layers.config.dim)
                except MalformedTensor as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session {session_id}: {e}")
                if msg.HasField("position"):
                    if msg.position > session.cache.length:
                        context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"session {session_id}: rows from position {msg.position}, but {session.cache.length} held",
                        )
                    session.cache.truncate(msg.position)  # refused drafts: forget past the position
                started = time.perf_counter()
                y = session.layers.forward([x], [session.cache], [session.adapter])[0]
                session.last_used = time.monotonic()
                self._forget_kept()
                if self.used > self.budget:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this session's KV cache outgrew the budget")
                out = self._output(y, session_id, msg.step, session.dtype)
                if msg.HasField("position"):
                    out.position = msg.position  # the next worker's rows start where this one's did
                out.compute_us.extend([*msg.compute_us, int((time.perf_counter() - started) * 1e6)])
                with self.lock:
                    self.contributed["compute_s"] += out.compute_us[-1] / 1e6
                    self.contributed["hidden_bytes"] += len(msg.data)
                if session.reply:
                    yield out
                elif session.downstream is not None:
                    session.downstream.send(out)
                else:
                    self._results(session_id).put(out)
        finally:  # the stream is over: so is the session, and its KV cache is freed
            if session is not None:
                self._release(session_id, _failure(context))

    def Attest(self, request, context):
        """This device's signed statement of its compute since the last one; the counters restart."""
        if not is_appliance(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the appliance may ask for statements")
        with self.lock:
            amounts, since = dict(self.contributed), self.attested_at
            self.contributed = {"compute_s": 0.0, "hidden_bytes": 0}
            self.attestations += 1
            self.attested_at, seq = time.time(), self.attestations
        s = Statement.make(self.identity, "offload", amounts, since, seq)
        return pb.Attestation(statement=s.body, signature=s.signature, certificate=s.cert_pem)

    def _output(self, hidden: np.ndarray, session_id: str, step: int, dtype: str) -> pb.Activation:
        return encode(hidden, session_id, step, dtype)

    def _downstream_failed(self, context, error: grpc.RpcError, address: str) -> None:
        """End this stream for a failure further down the chain, naming the worker at fault if known."""
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the next worker refused what this one sent
            context.abort(grpc.StatusCode.DATA_LOSS, f"the next worker refused this worker's output: {error.details()}")
        if error.code() == grpc.StatusCode.DATA_LOSS:
            culprit = dict(error.trailing_metadata() or ()).get(CULPRIT_KEY) or address
            context.set_trailing_metadata(((CULPRIT_KEY, culprit),))
            context.abort(grpc.StatusCode.DATA_LOSS, error.details())
        context.abort(grpc.StatusCode.UNAVAILABLE, f"next worker {address}: {error.code().name}: {error.details()}")

    def _adapter(self, hop: pb.Hop, context) -> LoraAdapter | None:
        """The hop's LoRA adapter from the pushed tensors (built once per set of tensors), or None."""
        if not hop.adapter:
            return None
        key = tuple(t.sha256 for t in hop.adapter)
        with self.lock:
            if key in self.adapters:
                return self.adapters[key]
        missing = [t.name for t in hop.adapter if not self.tensors.has(t.sha256)]
        if missing or any(t.ggml_type != GGMLQuantizationType.F32 for t in hop.adapter):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter tensors missing or not F32: {missing[:3]}")
        try:
            arrays = {
                t.name: self.tensors.read(t).view(np.float32).reshape(tuple(int(n) for n in t.shape))
                for t in hop.adapter
            }
            adapter = from_wire(key[0][:12], arrays)
        except (ValueError, AdapterError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot build the adapter: {e}")
        with self.lock:
            while len(self.adapters) >= 8:  # a few adapters in use at once; older ones are rebuilt on demand
                self.adapters.pop(next(iter(self.adapters)))
            self.adapters[key] = adapter
        return adapter

    def _open(self, first: pb.Activation, context, inbox: queue.Queue) -> WorkerSession:
        hop = first.hop
        key = (hop.model_id, hop.layer_start, hop.layer_stop)
        if key not in self.ranges:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"layers [{hop.layer_start}, {hop.layer_stop}) not loaded"
            )
        if first.dtype not in WIRE_DTYPES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wire dtype {first.dtype!r} not supported")
        layers = self.ranges[key].layers
        adapter = self._adapter(hop, context)
        downstream = None
        if first.next:
            nxt = first.next[0]
            header = pb.Activation(hop=nxt, next=list(first.next[1:]), deliver=first.deliver)
            downstream = Downstream(nxt.address, secure_channel(nxt.address, self.identity), header, inbox.put)
        with self.lock:
            if first.session_id in self.sessions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"session {first.session_id} is already open")
            reply = first.deliver == pb.REPLY and not first.next
            resumed = self.resumed.pop(first.session_id, None)
            cache = resumed.cache if resumed is not None and resumed.key == key else layers.new_cache()
            session = WorkerSession(layers, key, cache, first.dtype, reply, downstream, adapter=adapter)
            self.sessions[first.session_id] = session
        return session

    def Results(self, request, context):
        q = self._results(request.session_id)
        while context.is_active():
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, StreamFailed):  # end as the session's Forward stream ended
                context.set_trailing_metadata(item.metadata)
                context.abort(item.code, item.details)
            yield item

    def _results(self, session_id: str) -> queue.Queue:
        with self.lock:
            return self.results.setdefault(session_id, queue.Queue())

    def Release(self, request, context):
        return pb.ReleaseReply(released=self._release(request.session_id, keep=request.keep))

    def Resume(self, request, context):
        """A copy of a kept session's first positions, which the new session's Forward stream takes."""
        hop = request.hop
        key = (hop.model_id, hop.layer_start, hop.layer_stop)
        with self.lock:
            kept, loaded = self.kept.get(request.kept_session_id), self.ranges.get(key)
            if kept is not None:
                self.kept.move_to_end(request.kept_session_id)
        if kept is None or loaded is None:
            return pb.ResumeReply(reason=f"session {request.kept_session_id} is not kept here")
        if kept.key != key or kept.cache.length < request.positions:
            have = f"[{kept.key[1]}, {kept.key[2]}) x {kept.cache.length}"
            want = f"[{key[1]}, {key[2]}) x {request.positions}"
            return pb.ResumeReply(reason=f"kept positions are layers {have}, not {want}")
        self._forget_kept(kept.cache.nbytes)
        cache = loaded.layers.new_cache().fill(kept.cache.k, kept.cache.v, request.positions)
        with self.lock:
            self.resumed[request.session_id] = Kept(key, cache)
        return pb.ResumeReply(resumed=True)

    def _release(self, session_id: str, failed: StreamFailed | None = None, keep: int = 0) -> bool:
        """Free a session (keeping its first `keep` positions); its Results stream, if any, ends cleanly or, if
        its Forward stream failed, so."""
        with self.lock:
            self.resumed.pop(session_id, None)  # a Resume's copy its stream has not taken yet
            session = self.sessions.pop(session_id, None)
            results = self.results.pop(session_id, None)
            downstream = session.downstream if session is not None else None
            if session is not None:
                session.closed, session.downstream = True, None
                if keep and isinstance(session.cache, KVCache) and session.cache.length:  # host caches only
                    session.cache.truncate(min(keep, session.cache.length))
                    self.kept[session_id] = Kept(session.key, session.cache)
        if keep:
            self._forget_kept()
        if results is not None:
            results.put(failed)
        if downstream is not None:
            downstream.close()
        return session is not None

    def Health(self, request, context):
        return pb.HealthReply(serving=True, sessions=len(self.sessions), memory_used_bytes=self.used)

    def _reap_idle(self) -> None:
        while True:
            time.sleep(min(5.0, self.idle_s / 2))
            now = time.monotonic()
            for sid in [s for s, v in list(self.sessions.items()) if now - v.last_used > self.idle_s]:
                self._release(sid)
            with self.lock:  # copies Resume made for a stream that never came
                for sid in [s for s, k in self.resumed.items() if now - k.at > self.idle_s]:
                    del self.resumed[sid]


def measure_gflops(samples: int = 7, gap_s: float = 0.03) -> float:
    """What this device sustains on one-row matmuls like a decode step's: the median of spaced samples,
    each the best of a few runs. One burst taken while other processes start swung 0.2 to 85 GFLOP/s;
    a median over samples spread in time does not follow one busy moment."""
    a, w = np.ones((1, 1024), np.float32), np.ones((1024, 2048), np.float32)
    rates = []
    for _ in range(samples):
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            a @ w
            best = min(best, time.perf_counter() - t)
        rates.append(2 * 1024 * 2048 / max(best, 1e-9) / 1e9)
        time.sleep(gap_s)
    return statistics.median(rates)


def start_worker(
    identity: Identity,
    home: Path,
    host: str,
    port: int,
    budget: int,
    idle_s: float = 600,
    backend: str = "auto",
    service_class: type[WorkerService] = WorkerService,
    threads: int | None = None,
    models: list[Path] = (),
    keep_bytes: int = 256 << 20,
) -> tuple[grpc.Server, WorkerService, int]:
    """models: model files this worker holds (besides its store's): their layers are read here, not shipped.
    keep_bytes: the most that finished sessions' kept positions (the prefix cache) may hold."""
    name = certificate_name(identity.certificate)
    chosen = select_backend(backend, threads)
    service = service_class(name, identity, home, budget, chosen, idle_s, list(models), keep_bytes)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        interceptors=[RevocationCheck(service.revocations)],
        options=MESSAGE_OPTIONS,
    )
    rpc.add_OffloadServicer_to_server(service, server)
    creds = grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem, require_client_auth=True
    )
    bound = server.add_secure_port(f"{host}:{port}", creds)
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, service, bound


# -- command line ---------------------------------------------------------------------------------
cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def default_home() -> Path:
    return Path(os.environ.get("APPLIANCE_WORKER_HOME", Path.home() / ".appliance-worker"))


@cli.command()
def run(
    port: Annotated[int, typer.Option(help="Port for the appliance's offload connections.")] = 50051,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    pair: Annotated[str | None, typer.Option("--pair", help="Pairing code shown by the appliance.")] = None,
    appliance: Annotated[
        str | None, typer.Option(help="The appliance's URL for pairing, https://HOST:8000 (default: found by mDNS).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="This device's name (default: the host name).")] = None,
    memory_budget: Annotated[str, typer.Option(help="Most memory for layers and KV caches, e.g. 2GB.")] = "2GB",
    idle_timeout: Annotated[float, typer.Option(help="Seconds before an idle session is freed.")] = 600.0,
    home: Annotated[Path | None, typer.Option(help="Certificates and tensor cache.")] = None,
    advertise: Annotated[bool, typer.Option(help="Announce this worker on the LAN by mDNS.")] = True,
    pair_only: Annotated[bool, typer.Option(help="Pair, then exit without serving.")] = False,
    backend: Annotated[str, typer.Option(help="Compute backend: auto, cpu, cuda, numpy.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads of the cpu backend's kernels (default: this machine's cores).")
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", help="A model file held here: its layers are read from it, not shipped; repeatable."),
    ] = None,
    prefix_cache_mb: Annotated[
        int,
        typer.Option(min=0, help="MiB of finished sessions' KV kept for the next turn of a chat (0: none)."),
    ] = 256,
) -> None:
    """Run layers for a paired appliance: `appliance-worker --port 50051 --pair CODE`."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    home = home or default_home()
    name = name or os.uname().nodename
    try:
        budget = parse_size(memory_budget)
        if pair:
            from offload.pairing import pair_with_appliance

            pair_with_appliance(pair, appliance, name, home)
            err.print(f"paired with the appliance as {name!r}; certificate in {home}")
        identity = Identity.load(home, "worker")
        if identity is None:
            raise PairingError(f"this worker is not paired ({home} has no certificate): run it with --pair CODE")
        if pair_only:
            return
        missing = [str(p) for p in model or [] if not p.is_file()]
        if missing:
            raise ValueError(f"--model: no such file: {', '.join(missing)}")
        server, service, bound = start_worker(
            identity,
            home,
            host,
            port,
            budget,
            idle_timeout,
            backend,
            threads=threads,
            models=model or [],
            keep_bytes=prefix_cache_mb << 20,
        )
    except (PairingError, ValueError, OSError) as e:
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    zc = None
    if advertise:
        from offload.discovery import advertise_worker

        zc = advertise_worker(service.name, bound)
    err.print(
        f"worker {service.name!r} serving on {host}:{bound} ({service.gflops:.1f} GFLOP/s, budget {memory_budget}, "
        f"backend {describe(service.backend)})"
    )
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        if zc is not None:
            zc.close()
        server.stop(grace=1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
