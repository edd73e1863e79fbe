"""The appliance's side of one worker: check who it is, measure it, ship it layers, stream through it."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography import x509

from models.llama import Llama, layer_tensor_names
from models.speculative import K_MAX
from offload import offload_pb2 as pb
from offload import offload_pb2_grpc as rpc
from offload.errors import WorkerRefused
from offload.ledger import Statement
from offload.pki import Identity, certificate_name
from offload.protocol import CULPRIT_KEY, PROTOCOL, secure_channel
from offload.wire import MalformedTensor, chunks, decode, encode, tensor_spec

DECODE_ROWS = 1 + K_MAX  # rows of a decode step: its token and its drafts


class ChainBroken(Exception):
    """A chain of workers failed mid-stream: a worker died, hung past its deadline, or sent garbage."""

    def __init__(self, message: str, culprit: str | None = None):
        super().__init__(message)
        self.culprit = culprit  # the worker known to be at fault, when one is


def peer_certificate(address: str, identity: Identity, timeout: float = 5.0) -> x509.Certificate:
    """The worker's certificate, from a TLS handshake that verifies it against our CA and shows ours."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # workers live at any LAN address; our CA's signature is the proof
    ctx.load_verify_locations(cadata=identity.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as d:  # ssl loads a key pair from files only
        key, cert = os.path.join(d, "k"), os.path.join(d, "c")
        for path, data in ((key, identity.key_pem), (cert, identity.cert_pem)):
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            ctx.wrap_socket(sock) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        raise WorkerRefused(
            f"worker {address}: its certificate is not from this appliance's CA ({e.verify_message}); "
            f"pair it with `appliance-ctl workers pair`"
        ) from e
    except ssl.SSLError as e:
        raise WorkerRefused(f"worker {address}: no mutual TLS with a paired certificate ({e.reason})") from e
    except OSError as e:
        raise WorkerRefused(f"worker {address}: unreachable ({e})") from e
    return x509.load_der_x509_certificate(der)


@dataclass
class LinkStats:
    one_way_ms: float
    bytes_per_ms: float


def no_revocations() -> frozenset[int]:
    return frozenset()


@dataclass
class Shipping:
    sent_bytes: int
    total_bytes: int


class WorkerClient:
    """revoked: the CA's revoked serials now (read at each call: the owner may revoke while we run)."""

    def __init__(self, address: str, identity: Identity, revoked: Callable[[], frozenset[int]] = no_revocations):
        self.address, self.identity, self.revoked = address, identity, revoked
        self.shipping: Shipping | None = None  # weights on their way to the worker now (appliance-ctl's bar)
        self.shipped_bytes = 0  # weights sent to it in all
        self.channel = secure_channel(address, identity)
        self.stub = rpc.OffloadStub(self.channel)
        self.capabilities: pb.Capabilities | None = None
        self.serial: int | None = None  # of the worker's certificate, once verified

    def verify(self, timeout: float = 5.0) -> pb.Capabilities:
        """Refuse a worker that is not paired with us or whose certificate was revoked; tell it ours."""
        cert = peer_certificate(self.address, self.identity, timeout)
        if cert.serial_number in self.revoked():
            raise WorkerRefused(f"worker {self.address} ({certificate_name(cert)}): its certificate was revoked")
        self.serial = cert.serial_number
        caps = self.capabilities_now(timeout)
        if caps.protocol != PROTOCOL:
            raise WorkerRefused(f"worker {self.address} speaks {caps.protocol!r}, not {PROTOCOL!r}")
        return caps

    def capabilities_now(self, timeout: float = 5.0) -> pb.Capabilities:
        """Its capabilities (speed re-measured when stale), telling it the serials we revoked."""
        try:
            request = pb.CapabilitiesRequest(revoked_serials=[str(s) for s in sorted(self.revoked())])
            self.capabilities = self.stub.GetCapabilities(request, timeout=timeout)
        except grpc.RpcError as e:
            raise WorkerRefused(f"worker {self.address}: {e.code().name}: {e.details()}") from e
        return self.capabilities

    def measure_link(self, probes: int = 5, payload: int = 256 << 10) -> LinkStats:
        """Round-trip time from empty health calls; bandwidth from one carrying `payload` bytes."""
        rtts = []
        for _ in range(probes):
            t = time.perf_counter()
            self.stub.Health(pb.HealthRequest(), timeout=5)
            rtts.append((time.perf_counter() - t) * 1e3)
        rtt = statistics.median(rtts)
        t = time.perf_counter()
        self.stub.Health(pb.HealthRequest(padding=bytes(payload)), timeout=30)
        extra = max((time.perf_counter() - t) * 1e3 - rtt, 1e-3)
        return LinkStats(rtt / 2, payload / extra)

    def holds(self, file_sha256: str) -> bool:
        """Whether the worker reads layers of this model file from its own copy (nothing shipped)."""
        return self.capabilities is not None and file_sha256 in self.capabilities.model_files

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            return self.stub.Health(pb.HealthRequest(), timeout=timeout).serving
        except grpc.RpcError:
            return False

    def ensure_layers(
        self,
        model: Llama,
        model_id: str,
        start: int,
        stop: int,
        manifest: list[pb.TensorSpec],
        owner: str = "",
        generation: int = 0,
        file_sha256: str = "",
    ) -> None:
        """Ship the tensors the worker lacks (none if it holds the model file `file_sha256` itself, or
        has them in its disk cache), then have it build layers [start, stop) for `owner`'s plan
        `generation` (which frees what that owner's older plans left there)."""
        listed = pb.Manifest(tensors=manifest, file_sha256=file_sha256)
        self.push(manifest, {name: t.raw for name, t in model.file.tensors.items()}, file_sha256)
        self.stub.LoadLayers(
            pb.LoadRequest(
                model_id=model_id,
                config_json=model.config.to_json(),
                layer_start=start,
                layer_stop=stop,
                manifest=listed,
                owner=owner,
                generation=generation,
            ),
            timeout=120,
        )

    def push(self, manifest: list[pb.TensorSpec], raw: dict[str, np.ndarray], file_sha256: str = "") -> None:
        """Ship the tensors of `manifest` (bytes by name in `raw`) that the worker lacks: none if it holds
        the model file `file_sha256` itself, else those its disk cache lacks."""
        listed = pb.Manifest(tensors=manifest, file_sha256=file_sha256)
        missing = set(self.stub.MissingTensors(listed, timeout=30).sha256)
        if not missing:
            return
        todo = {spec.sha256: spec for spec in manifest if spec.sha256 in missing}  # the same bytes ship once
        shipping = self.shipping = Shipping(0, sum(raw[spec.name].nbytes for spec in todo.values()))

        def stream():
            for spec in todo.values():
                for chunk in chunks(spec, raw[spec.name]):
                    shipping.sent_bytes += len(chunk.data)
                    self.shipped_bytes += len(chunk.data)
                    yield chunk

        try:
            self.stub.PushTensors(stream(), timeout=600)
        finally:
            self.shipping = None

    def attest(self, timeout: float = 5.0) -> Statement:
        """The worker's signed statement of its compute for us since its last one (offload/ledger.py)."""
        a = self.stub.Attest(pb.AttestRequest(), timeout=timeout)
        return Statement(a.statement, a.signature, a.certificate)

    def release(self, session_id: str, keep: int = 0) -> None:
        """keep: the session's first positions to keep for a later Resume (the prefix cache)."""
        # A dead worker has freed it already; a live one that misses this frees it when idle.
        with contextlib.suppress(grpc.RpcError, ValueError):  # ValueError: its channel is closed
            self.stub.Release(pb.ReleaseRequest(session_id=session_id, keep=keep), timeout=2)

    def resume(self, session_id: str, kept_session_id: str, positions: int, hop: pb.Hop) -> bool:
        """Start session_id from a released session's kept positions; False where this worker no longer has them."""
        request = pb.ResumeRequest(session_id=session_id, kept_session_id=kept_session_id, positions=positions, hop=hop)
        try:
            return self.stub.Resume(request, timeout=2).resumed
        except (grpc.RpcError, ValueError):
            return False

    def close(self) -> None:
        self.channel.close()


def layer_manifest(model: Llama, start: int, stop: int) -> list[pb.TensorSpec]:
    tensors = model.file.tensors
    specs = []
    for i in range(start, stop):
        for name in layer_tensor_names(i, model.config.spec).values():
            t = tensors[name]
            specs.append(tensor_spec(t.name, t.qtype, t.shape, t.raw))
    return specs


class ChainSession:
    """One session's stream through a chain of workers: appliance -> w1 -> ... -> wN -> appliance.

    The first worker gets a Forward stream; the last sends its outputs on a Results stream the
    appliance opened to it, so a token crosses N workers in N + 1 one-way trips.
    """

    def __init__(
        self, session_id: str, chain: list[tuple[WorkerClient, pb.Hop]], dtype: str, dim: int, timeout_s: float
    ):
        self.session_id, self.chain, self.dtype, self.dim, self.timeout_s = session_id, chain, dtype, dim, timeout_s
        self.step = 0
        self.sent_at = 0.0
        self.overhead_ms: list[float] = []  # per decode step (a token and its drafts): waiting on the chain
        # minus its compute
        self.hop_ms: list[float] = []  # each worker's time on the last reply, in chain order
        self.replies: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        (first, first_hop), (last, _) = chain[0], chain[-1]
        self.header = pb.Activation(
            hop=first_hop,
            next=[hop for _, hop in chain[1:]],
            deliver=pb.REPLY if len(chain) == 1 else pb.RESULTS,
        )
        self.calls = []
        forward = first.stub.Forward(iter(self.outbox.get, None))
        self.calls.append(forward)
        self._read(forward, first.address, deliver=len(chain) == 1)
        if len(chain) > 1:
            results = last.stub.Results(pb.ResultsRequest(session_id=session_id))
            self.calls.append(results)
            self._read(results, last.address, deliver=True, sender=chain[-2][0].address)

    def _read(self, call, address: str, deliver: bool, sender: str | None = None) -> None:
        """Pump a stream's replies (or its failure) into self.replies. sender: the worker whose outputs
        this one takes; if this one refused its input (INVALID_ARGUMENT), that worker is at fault."""

        def pump():
            try:
                for msg in call:
                    if deliver:
                        self.replies.put((address, msg))
                if deliver:
                    self.replies.put((address, ChainBroken(f"worker {address} ended the stream")))
            except grpc.RpcError as e:
                culprit = None
                if e.code() == grpc.StatusCode.DATA_LOSS:  # a malformed tensor: the chain says whose
                    culprit = dict(e.trailing_metadata() or ()).get(CULPRIT_KEY) or address
                elif e.code() == grpc.StatusCode.INVALID_ARGUMENT and sender:
                    culprit = sender
                broken = ChainBroken(f"worker {address}: {e.code().name}: {e.details()}", culprit)
                self.replies.put((address, broken))

        threading.Thread(target=pump, daemon=True).start()

    def send(self, hidden: np.ndarray, position: int) -> None:
        """The session's rows from `position` on (workers forget any positions they hold past it)."""
        msg = encode(hidden, self.session_id, self.step, self.dtype)
        msg.position = position
        if self.header is not None:
            msg.MergeFrom(self.header)
            self.header = None
        self.step += 1
        self.sent_at = time.perf_counter()
        self.outbox.put(msg)

    def receive(self, rows: int) -> np.ndarray:
        try:
            address, item = self.replies.get(timeout=self.timeout_s * (1 + rows / 64))
        except queue.Empty:
            raise ChainBroken(f"no reply within {self.timeout_s:.1f} s") from None
        if isinstance(item, Exception):
            raise item
        try:
            out = decode(item, self.dim)
        except MalformedTensor as e:
            raise ChainBroken(f"worker {address} sent a malformed tensor: {e}", culprit=address) from e
        if out.shape[0] != rows:
            raise ChainBroken(f"worker {address} sent {out.shape[0]} rows for {rows}", culprit=address)
        self.hop_ms = [us / 1e3 for us in item.compute_us]
        if rows <= DECODE_ROWS:
            self.overhead_ms.append((time.perf_counter() - self.sent_at) * 1e3 - sum(self.hop_ms))
        return out

    def close(self, keep: int = 0) -> None:
        """keep: each worker keeps the session's first `keep` positions. Told before the streams end (which
        would free them), last hop first: a worker's release ends its stream to the next hop."""
        if keep:
            for worker, _ in reversed(self.chain):
                worker.release(self.session_id, keep)
        self.outbox.put(None)
        for call in self.calls:
            call.cancel()
        for worker, _ in self.chain:
            threading.Thread(target=worker.release, args=(self.session_id,), daemon=True).start()
