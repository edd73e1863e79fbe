"""`appliance-worker`: runs layer ranges for the appliance on a LAN device, over mutual TLS.

It keeps shipped tensors in a disk cache named by their SHA-256 (a restart does not re-ship them),
holds any number of sessions' KV caches, frees them on release or when idle, and refuses what its
memory budget cannot hold. Outputs go to the next worker of the chain directly, or, from the last
one, straight back to the appliance.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import typer
from gguf import GGMLQuantizationType

from kernels.backend import Backend, select_backend
from models.llama import KVCache, LayerRange, LayerWeights, LlamaConfig
from offload import offload_pb2 as pb
from offload import offload_pb2_grpc as rpc
from offload.pki import Identity, PairingError, certificate_name
from offload.planner import parse_size
from offload.revocation import RevocationCheck, Revocations, is_appliance
from offload.wire import PROTOCOL, WIRE_DTYPES, MalformedTensor, decode, encode

CULPRIT_KEY = "offload-culprit"  # trailing metadata: the address of the worker that sent a malformed tensor
LAYER_PARTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
FIELD_OF_PART = dict(zip(LAYER_PARTS, LayerWeights.__dataclass_fields__, strict=True))


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


@dataclass
class WorkerSession:
    layers: LayerRange
    key: tuple[str, int, int]
    cache: KVCache
    dtype: str
    reply: bool  # outputs go back on the Forward stream (a one-worker chain) rather than onward
    downstream: Downstream | None = None
    last_used: float = field(default_factory=time.monotonic)


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
    def __init__(self, name: str, identity: Identity, home: Path, budget: int, backend: Backend, idle_s: float):
        self.name, self.identity, self.budget, self.backend, self.idle_s = name, identity, budget, backend, idle_s
        self.tensors = TensorCache(home / "tensors")
        self.revoked = Revocations(home / "revoked.json")
        self.ranges: dict[tuple[str, int, int], tuple[LayerRange, int]] = {}  # key -> (layers, stored bytes)
        self.sessions: dict[str, WorkerSession] = {}
        self.results: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.gflops = _measure_gflops()
        threading.Thread(target=self._reap_idle, daemon=True).start()

    # -- memory ------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        with self.lock:
            return sum(b for _, b in self.ranges.values()) + sum(s.cache.nbytes for s in self.sessions.values())

    @property
    def pinned(self) -> int:
        """Memory that open sessions hold: their ranges and caches. The rest can be evicted for new layers."""
        with self.lock:
            in_use = {s.key for s in self.sessions.values()}
            ranges = sum(b for k, (_, b) in self.ranges.items() if k in in_use)
            return ranges + sum(s.cache.nbytes for s in self.sessions.values())

    def _evict_unused(self, need: int) -> None:
        """Drop loaded ranges no session uses until `need` more bytes fit (a re-plan leaves old ones behind)."""
        with self.lock:
            in_use = {s.key for s in self.sessions.values()}
            for key in [k for k in self.ranges if k not in in_use]:
                if sum(b for _, b in self.ranges.values()) + need <= self.budget:
                    break
                del self.ranges[key]

    # -- rpc ---------------------------------------------------------------------------------
    def GetCapabilities(self, request, context):
        if request.revoked_serials:
            if not is_appliance(context):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the appliance may revoke certificates")
            self.revoked.add(request.revoked_serials)
        return pb.Capabilities(
            protocol=PROTOCOL,
            name=self.name,
            backend=self.backend.name,
            memory_budget_bytes=self.budget,
            memory_used_bytes=self.pinned,
            gflops=self.gflops,
            wire_dtypes=list(WIRE_DTYPES),
        )

    def MissingTensors(self, request, context):
        return pb.TensorHashes(sha256=[t.sha256 for t in request.tensors if not self.tensors.has(t.sha256)])

    def PushTensors(self, request_iterator, context):
        try:
            return pb.PushReply(stored=self.tensors.receive(request_iterator))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def LoadLayers(self, request, context):
        key = (request.model_id, request.layer_start, request.layer_stop)
        if key in self.ranges:
            return pb.LoadReply(bytes=self.ranges[key][1])
        specs = {t.name: t for t in request.manifest.tensors}
        need = sum(t.nbytes for t in specs.values())
        self._evict_unused(need)
        if self.used + need > self.budget:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"layers [{request.layer_start}, {request.layer_stop}) need {need / 1e6:.1f} MB; this worker's "
                f"budget is {self.budget / 1e6:.1f} MB with {self.used / 1e6:.1f} MB in use",
            )
        missing = [t.name for t in specs.values() if not self.tensors.has(t.sha256)]
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"tensors not pushed yet: {', '.join(missing[:3])}")
        try:
            config = LlamaConfig(**json.loads(request.config_json))
            layers = [self._layer(i, specs) for i in range(request.layer_start, request.layer_stop)]
        except (TypeError, ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot build layers from this request: {e}")
        with self.lock:
            self.ranges[key] = (LayerRange(config, self.backend, request.layer_start, layers), need)
        return pb.LoadReply(bytes=need)

    def _layer(self, i: int, specs: dict[str, pb.TensorSpec]) -> LayerWeights:
        parts = {}
        for part in LAYER_PARTS:
            spec = specs[f"blk.{i}.{part}.weight"]
            raw = self.tensors.read(spec)
            parts[FIELD_OF_PART[part]] = self.backend.weight(
                raw, GGMLQuantizationType(spec.ggml_type), tuple(int(n) for n in spec.shape)
            )
        return LayerWeights(**parts)

    def Forward(self, request_iterator, context):
        """Requests and the next hop's failure arrive in one inbox, so a failure downstream ends this
        stream at once, saying which worker is at fault, rather than at the next request."""
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_pump_requests, args=(request_iterator, inbox), daemon=True).start()
        session_id, session = None, None
        try:
            while (msg := inbox.get()) is not None:
                if isinstance(msg, grpc.RpcError):
                    self._downstream_failed(context, msg, session.downstream.address)
                if session is None:
                    session_id, session = msg.session_id, self._open(msg, context, inbox)
                try:
                    x = decode(msg, session.layers.config.dim)
                except MalformedTensor as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session {session_id}: {e}")
                started = time.perf_counter()
                y = session.layers.forward([x], [session.cache])[0]
                session.last_used = time.monotonic()
                if self.used > self.budget:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this session's KV cache outgrew the budget")
                out = self._output(y, session_id, msg.step, session.dtype)
                out.compute_us.extend([*msg.compute_us, int((time.perf_counter() - started) * 1e6)])
                if session.reply:
                    yield out
                elif session.downstream is not None:
                    session.downstream.send(out)
                else:
                    self._results(session_id).put(out)
        finally:
            if session is not None and session.downstream is not None:
                session.downstream.close()
                session.downstream = None

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

    def _open(self, first: pb.Activation, context, inbox: queue.Queue) -> WorkerSession:
        hop = first.hop
        key = (hop.model_id, hop.layer_start, hop.layer_stop)
        if key not in self.ranges:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"layers [{hop.layer_start}, {hop.layer_stop}) not loaded"
            )
        if first.dtype not in WIRE_DTYPES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wire dtype {first.dtype!r} not supported")
        layers = self.ranges[key][0]
        downstream = None
        if first.next:
            nxt = first.next[0]
            header = pb.Activation(hop=nxt, next=list(first.next[1:]), deliver=first.deliver)
            downstream = Downstream(nxt.address, secure_channel(nxt.address, self.identity), header, inbox.put)
        with self.lock:
            if first.session_id in self.sessions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"session {first.session_id} is already open")
            reply = first.deliver == pb.REPLY and not first.next
            session = WorkerSession(layers, key, layers.new_cache(), first.dtype, reply, downstream)
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
            yield item

    def _results(self, session_id: str) -> queue.Queue:
        with self.lock:
            return self.results.setdefault(session_id, queue.Queue())

    def Release(self, request, context):
        return pb.ReleaseReply(released=self._release(request.session_id))

    def _release(self, session_id: str) -> bool:
        with self.lock:
            session = self.sessions.pop(session_id, None)
            results = self.results.pop(session_id, None)
        if results is not None:
            results.put(None)
        if session is not None and session.downstream is not None:
            session.downstream.close()
        return session is not None

    def Health(self, request, context):
        return pb.HealthReply(serving=True, sessions=len(self.sessions), memory_used_bytes=self.used)

    def _reap_idle(self) -> None:
        while True:
            time.sleep(min(5.0, self.idle_s / 2))
            now = time.monotonic()
            for sid in [s for s, v in list(self.sessions.items()) if now - v.last_used > self.idle_s]:
                self._release(sid)


def _measure_gflops() -> float:
    """One-row matmuls like a decode step's: what this device sustains when it runs layers."""
    a, w = np.ones((1, 1024), np.float32), np.ones((1024, 2048), np.float32)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        a @ w
        best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 2048 / best / 1e9


# -- mutual TLS -----------------------------------------------------------------------------------
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.ssl_target_name_override", "appliance-worker"),
]


def secure_channel(address: str, identity: Identity) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
    return grpc.secure_channel(address, creds, options=GRPC_OPTIONS)


def start_worker(
    identity: Identity,
    home: Path,
    host: str,
    port: int,
    budget: int,
    idle_s: float = 600,
    backend: str = "auto",
    service_class: type[WorkerService] = WorkerService,
) -> tuple[grpc.Server, WorkerService, int]:
    name = certificate_name(identity.certificate)
    service = service_class(name, identity, home, budget, select_backend(backend), idle_s)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        interceptors=[RevocationCheck(service.revoked)],
        options=GRPC_OPTIONS[:2],
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
        str | None, typer.Option(help="The appliance's HTTP address for pairing (default: found by mDNS).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="This device's name (default: the host name).")] = None,
    memory_budget: Annotated[str, typer.Option(help="Most memory for layers and KV caches, e.g. 2GB.")] = "2GB",
    idle_timeout: Annotated[float, typer.Option(help="Seconds before an idle session is freed.")] = 600.0,
    home: Annotated[Path | None, typer.Option(help="Certificates and tensor cache.")] = None,
    advertise: Annotated[bool, typer.Option(help="Announce this worker on the LAN by mDNS.")] = True,
    pair_only: Annotated[bool, typer.Option(help="Pair, then exit without serving.")] = False,
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
        server, service, bound = start_worker(identity, home, host, port, budget, idle_timeout)
    except (PairingError, ValueError, OSError) as e:
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    zc = None
    if advertise:
        from offload.discovery import advertise_worker

        zc = advertise_worker(service.name, bound)
    err.print(
        f"worker {service.name!r} serving on {host}:{bound} ({service.gflops:.1f} GFLOP/s, budget {memory_budget})"
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
