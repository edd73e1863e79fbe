"""What one round trip of a hidden state costs a transport, apart from any model: the floor under
bench-offload's "wire" figures.

An echo process sends each message straight back; the client waits `idle_ms` between messages, as
the appliance does while layers compute, so each message meets threads that have gone to sleep.
Over a plain TCP socket (llama.cpp's RPC is one) and over a gRPC stream with our mutual TLS and
channel options (what the offload chain uses).
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from offload.pki import Identity
from offload.protocol import MESSAGE_OPTIONS, secure_channel

ECHO_METHOD = "/appliance.Echo/Stream"


def _tcp_echo(size: int, identity: Identity | None, port_out) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    if identity is not None:
        conn = _tls(identity, ssl.Purpose.CLIENT_AUTH).wrap_socket(conn, server_side=True)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while message := _recv_exactly(conn, size):
        conn.sendall(message)


def _tls(identity: Identity, purpose: ssl.Purpose) -> ssl.SSLContext:
    """Mutual TLS from the same PEMs the gRPC channels use (ssl wants files for the key pair)."""
    context = ssl.create_default_context(purpose, cadata=identity.ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(identity.cert_pem)
        key.write_bytes(identity.key_pem)
        context.load_cert_chain(cert, key)
    return context


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        if not (part := conn.recv(size - len(data))):
            return b""
        data += part
    return data


def _grpc_echo(identity: Identity, port_out) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=MESSAGE_OPTIONS)  # as a worker's
    handler = grpc.stream_stream_rpc_method_handler(lambda requests, context: requests)
    service, method = ECHO_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    creds = grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem, require_client_auth=True
    )
    port_out.send(server.add_secure_port("127.0.0.1:0", creds))
    server.start()
    server.wait_for_termination()


def _socket_trip(conn: socket.socket, payload: bytes) -> Callable[[], None]:
    def trip() -> None:
        conn.sendall(payload)
        _recv_exactly(conn, len(payload))

    return trip


def _median_rtt(round_trip: Callable[[], None], idle_ms: float, n: int) -> float:
    times = []
    for _ in range(n):
        time.sleep(idle_ms / 1e3)
        t = time.perf_counter()
        round_trip()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[n // 10 :])


def measure_floor(
    message_bytes: int, client: Identity, server: Identity, idle_ms: float = 23.0, n: int = 100
) -> dict[str, float]:
    """Median round-trip ms per transport, each against an echo in a process of its own."""
    spawn = multiprocessing.get_context("spawn")
    result = {}
    payload = bytes(message_bytes)

    for name, tls in (("TCP", False), ("TCP, mTLS", True)):
        here, there = spawn.Pipe()
        proc = spawn.Process(target=_tcp_echo, args=(message_bytes, server if tls else None, there), daemon=True)
        proc.start()
        try:
            conn = socket.create_connection(("127.0.0.1", here.recv()))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                conn = _tls(client, ssl.Purpose.SERVER_AUTH).wrap_socket(conn)
            with conn:
                result[name] = _median_rtt(_socket_trip(conn, payload), idle_ms, n)
        finally:
            proc.kill()

    here, there = spawn.Pipe()
    proc = spawn.Process(target=_grpc_echo, args=(server, there), daemon=True)
    proc.start()
    try:
        channel = secure_channel(f"127.0.0.1:{here.recv()}", client)
        outbox: queue.Queue = queue.Queue()
        replies = channel.stream_stream(ECHO_METHOD)(iter(outbox.get, None))
        result["gRPC, mTLS"] = _median_rtt(lambda: (outbox.put(payload), next(replies)), idle_ms, n)
        outbox.put(None)
        channel.close()
    finally:
        proc.kill()
    return result
