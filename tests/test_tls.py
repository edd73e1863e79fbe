"""HTTPS and gRPC over TLS on the home-facing ports, with the appliance's own CA: one real `appliance serve
--tls --admin-mtls` on loopback for the module, driven by the official clients (openai, tritonclient http
and grpc, ollama) and by appliance-ctl; refused without the CA, for a wrong name, in clear; a relay on
the wire sees neither prompt nor key. Also the certificate's renewal, in-process, by the CA's clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance.serving.tls import ServerTLS
from appliance.testbed.launch import free_port, running
from models.store import model_name
from offload.pki import SERVER_NAME, CertificateAuthority, certificate_authority
from tests.serving import ADMIN_KEY, serve_command

KEY = "tls-secret-api-key-7f3a"
PROMPT = "Zanzibar quartz lantern: name the capital of France."


@dataclass
class TlsServer:
    port: int
    grpc_port: int
    pid: int
    home: Path
    ca_file: Path
    model: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path) -> Iterator[TlsServer]:
    home = tmp_path_factory.mktemp("tls") / "appliance"
    home.mkdir(mode=0o700)
    (home / "models").symlink_to(model_path.parent)
    port, grpc_port = free_port(), free_port()
    cmd = serve_command(port, grpc_port, KEY, ADMIN_KEY, "--model", str(model_path), "--tls", "--admin-mtls")
    cmd += ["--no-advertise", "--no-discover"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(home))
        mp.delenv("APPLIANCE_SERVER", raising=False)
        ca_file = home / "pki" / "ca.pem"
        with running(cmd, f"https://127.0.0.1:{port}/health", cafile=ca_file) as pid:
            yield TlsServer(port, grpc_port, pid, home, ca_file, model_name(model_path))


def trusting(server: TlsServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


# -- the official clients over TLS -----------------------------------------------------------------
def test_openai_client_streams_over_https(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, http_client=httpx.Client(verify=trusting(server)))
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces).strip()


def test_ollama_client_over_https(server):
    import ollama

    client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, verify=trusting(server))
    reply = client.generate(model=server.model, prompt="The capital of France is", options={"num_predict": 3})
    assert reply.response.strip() and reply.eval_count >= 1


def test_tritonclient_http_over_https(server):
    import gevent.ssl
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        f"localhost:{server.port}",
        ssl=True,
        ssl_context_factory=lambda: gevent.ssl.create_default_context(cafile=str(server.ca_file)),
    )
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
    tokens = httpclient.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([3], dtype=np.int32))
    result = client.infer(server.model, [text, tokens], headers={"Authorization": f"Bearer {KEY}"})
    assert result.as_numpy("text_output")[0].decode().strip()


def test_tritonclient_grpc_streams_over_tls(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(
        f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(server.ca_file)
    )
    assert client.is_server_ready(headers={"authorization": f"Bearer {KEY}"})
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([4], dtype=np.int32))
    stream_on = grpcclient.InferInput("stream", [1], "BOOL")
    stream_on.set_data_from_numpy(np.array([True]))
    seen: list = []
    done = threading.Event()

    def on_reply(result, error):
        seen.append(error or result)
        if error or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(on_reply, headers={"authorization": f"Bearer {KEY}"})
    client.async_stream_infer(server.model, [text, tokens, stream_on], enable_empty_final_response=True)
    assert done.wait(120), "no final response"
    client.stop_stream()
    assert not [r for r in seen if isinstance(r, Exception)], seen
    texts = [r.as_numpy("text_output") for r in seen]
    assert sum(t is not None and len(t) > 0 and bool(t[0]) for t in texts) >= 2  # streamed, piece by piece


# -- refused: untrusted, wrong name, in clear ------------------------------------------------------
def test_a_client_without_the_ca_is_refused_at_the_handshake(server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/health")  # the system's CAs only
    with (
        socket.create_connection(("127.0.0.1", server.port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    untrusting = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}", ssl=True)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE|handshake|certificate"):
        untrusting.is_server_live(client_timeout=10)


def test_a_wrong_hostname_is_refused(server):
    with (
        socket.create_connection(("127.0.0.1", server.port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        trusting(server).wrap_socket(raw, server_hostname="not-the-appliance.example")

    def ready(name: str, timeout: float) -> bool:
        channel = grpc.secure_channel(
            f"127.0.0.1:{server.grpc_port}",
            grpc.ssl_channel_credentials(server.ca_file.read_bytes()),
            options=[("grpc.ssl_target_name_override", name)],
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    assert ready("localhost", 30)  # the same channel with a name the certificate holds connects
    assert not ready("not-the-appliance.example", 3)


def test_no_plain_port_is_open(server):
    listening = {c.laddr.port for c in psutil.Process(server.pid).net_connections("inet") if c.status == "LISTEN"}
    assert listening == {server.port, server.grpc_port}  # nothing else: no plain-HTTP side door
    with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no HTTP answer
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
    plain = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(plain).result(timeout=3)
    plain.close()


# -- what the wire shows ---------------------------------------------------------------------------
@contextmanager
def tapped_relay(target_port: int) -> Iterator[tuple[int, bytearray]]:
    """A TCP relay on loopback to target_port that keeps every byte it forwards, both ways."""
    seen = bytearray()
    lock = threading.Lock()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with lock:
                    seen.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_capture_on_the_wire_finds_neither_prompt_nor_key(server):
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {KEY}"}
    with tapped_relay(server.port) as (port, seen):
        reply = httpx.post(
            f"https://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers, verify=trusting(server)
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
    assert len(seen) > 2000  # the handshake and the exchange went through the relay ...
    for secret in (PROMPT.encode(), KEY.encode(), b"Zanzibar", b"chat/completions", answer.encode()):
        assert secret not in seen, f"{secret!r} crossed the wire in clear"
    # ... and the same tap, on the same request sent in clear to a plain HTTP listener, does find them
    with plain_http_sink() as sink, tapped_relay(sink) as (port, clear):
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert KEY.encode() in clear and PROMPT.encode() in clear


@contextmanager
def plain_http_sink() -> Iterator[int]:
    """A listener that reads one plain HTTP request and answers 200: the control for the capture."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()


# -- appliance-ctl over TLS, and --admin-mtls ---------------------------------------------------------
def ctl(server: TlsServer, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "appliance.ctl", "--server", f"https://localhost:{server.port}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env or os.environ)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_ca_export_prints_the_ca_and_its_fingerprint(server):
    exported = ctl(server, "ca", "export")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.encode() == server.ca_file.read_bytes()
    cert = x509.load_pem_x509_certificate(exported.stdout.encode())
    fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert exported.stderr.replace(":", "").split()[-1] == fingerprint
    as_json = json.loads(ctl(server, "ca", "export", "--json").stdout)
    assert as_json["sha256"].replace(":", "") == fingerprint


def test_admin_needs_a_client_certificate_from_the_ca(server, tmp_path):
    """--admin-mtls: the right admin key without a certificate is refused (403, appliance-ctl exit 4);
    with one the CA issued it is accepted; revoked, it is refused again. gRPC, which asks for no client
    certificate, refuses administration."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    bare = httpx.get(f"{server.url}/admin/status", headers=admin, verify=trusting(server))
    assert bare.status_code == 403 and "certificate" in bare.json()["error"]["message"]

    device = tmp_path / "phone-home"
    issued = ctl(server, "ca", "issue", "phone", "--out", str(device), "--json")
    assert issued.returncode == 0, issued.stderr
    assert {p.name for p in device.iterdir()} == {"admin.pem", "admin.key", "ca.pem"}
    context = trusting(server)
    context.load_cert_chain(device / "admin.pem", device / "admin.key")
    assert httpx.get(f"{server.url}/admin/status", headers=admin, verify=context).status_code == 200
    wrong_key = httpx.get(f"{server.url}/admin/status", headers={"Authorization": "Bearer no"}, verify=context)
    assert wrong_key.status_code == 401  # the certificate does not replace the key

    # appliance-ctl on another device: only the three copied files in its APPLIANCE_HOME (no CA key there)
    other = {**os.environ, "APPLIANCE_HOME": str(device), "APPLIANCE_ADMIN_KEY": ADMIN_KEY}
    status = ctl(server, "status", "--json", env=other)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["model"] == server.model
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "ca.pem").write_bytes(server.ca_file.read_bytes())
    refused = ctl(server, "status", env={**other, "APPLIANCE_HOME": str(stranger)})
    assert refused.returncode == 4 and "certificate from its CA" in refused.stderr
    untrusted = ctl(server, "status", env={**other, "APPLIANCE_HOME": str(tmp_path / "empty")})
    assert untrusted.returncode == 3 and "--cacert" in untrusted.stderr
    flags = ["--cacert", str(server.ca_file), "--cert", str(device / "admin.pem"), "--key", str(device / "admin.key")]
    given = ctl(server, *flags, "status", "--json", env={**other, "APPLIANCE_HOME": str(stranger)})
    assert given.returncode == 0, given.stderr

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(
        f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(server.ca_file)
    )
    with pytest.raises(InferenceServerException, match="certificate from its CA") as refused_grpc:
        client.unload_model(server.model, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert "PERMISSION_DENIED" in str(refused_grpc.value.status())

    assert ctl(server, "workers", "revoke", "phone").returncode == 0
    revoked = httpx.get(f"{server.url}/admin/status", headers=admin, verify=context)
    assert revoked.status_code == 403 and "revoked" in revoked.json()["error"]["message"]


def test_appliance_ctl_on_the_appliance_needs_no_flags(server):
    """On the appliance itself, appliance-ctl finds the CA and its own certificate in APPLIANCE_HOME; asked in
    plain HTTP, it says to use https."""
    env = {**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY}
    status = ctl(server, "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    plain = [sys.executable, "-m", "appliance.ctl", "--server", f"http://127.0.0.1:{server.port}", "status"]
    refused = subprocess.run(plain, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 3 and "use --server https://" in refused.stderr, refused.stderr


def test_a_worker_pairs_over_https_and_finds_the_scheme_by_mdns(server, tmp_path):
    """Pairing goes over the TLS port (the code's MAC is the proof, the worker has no CA yet), and the
    appliance's mDNS announcement tells workers to use https."""
    from offload.discovery import APPLIANCE_TYPE, advertise, browse
    from offload.pairing import pair_with_appliance

    code = certificate_authority().new_code()
    identity = pair_with_appliance(code, server.url, "laptop", tmp_path / "laptop")
    assert identity.ca_pem == server.ca_file.read_bytes() and "laptop" in certificate_authority().workers()

    found, seen = threading.Event(), []
    announced = advertise(APPLIANCE_TYPE, f"appliance-{server.port}", server.port, {"scheme": "https"})
    listener = browse(APPLIANCE_TYPE, lambda a: (seen.append(a), a.endswith(f":{server.port}") and found.set()), True)
    try:
        assert found.wait(20), seen
    finally:
        listener.close()
        announced.close()
    assert f"https://127.0.0.1:{server.port}" in seen


# -- the certificate ---------------------------------------------------------------------------------
def test_the_owner_s_certificate_is_re_read_when_it_changes(tmp_path):
    """--tls-cert/--tls-key: a renewed pair written over the files (certbot's way) is served without a restart."""
    ca = CertificateAuthority(tmp_path / "pki")
    ca.server_identity(["localhost"], ["127.0.0.1"])
    cert, key = tmp_path / "owner.pem", tmp_path / "owner.key"
    for path, name in ((cert, f"{SERVER_NAME}.pem"), (key, f"{SERVER_NAME}.key")):
        path.write_bytes((ca.folder / name).read_bytes())
    tls = ServerTLS(cert, key)
    first = handshake_serial(tls, ca)
    assert tls.refresh() is False
    ca.server_identity(["localhost"], ["127.0.0.1"], renew_days=400)  # due: a new pair
    for path, name in ((cert, f"{SERVER_NAME}.pem"), (key, f"{SERVER_NAME}.key")):
        path.write_bytes((ca.folder / name).read_bytes())
    assert tls.refresh() is True and handshake_serial(tls, ca) not in (first, None)


def test_the_server_certificate_names_and_renewal(tmp_path):
    """The CA's certificate names every address it is reached by, and is renewed before it expires (the
    CA's clock moved), or when a new name appears; a running context takes the new one in place."""
    now = [time.time()]
    ca = CertificateAuthority(tmp_path / "pki", clock=lambda: now[0])
    tls = ServerTLS.from_ca(ca, "0.0.0.0", ["appliance.home.arpa"], admin_mtls=False)
    first = x509.load_pem_x509_certificate((ca.folder / f"{SERVER_NAME}.pem").read_bytes())
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    hostname = socket.gethostname()
    assert {"localhost", hostname, f"{hostname}.local", "appliance.home.arpa"} <= set(dns)
    assert {"127.0.0.1", "::1"} <= ips
    for addresses in psutil.net_if_addrs().values():
        assert {a.address for a in addresses if a.family == socket.AF_INET} <= ips
    assert first.not_valid_after_utc.timestamp() - now[0] > 300 * 86400

    assert tls.refresh() is False  # nothing is due
    serial_seen = [handshake_serial(tls, ca)]
    now[0] = first.not_valid_after_utc.timestamp() - 29 * 86400  # within 30 days of its end
    assert tls.refresh() is True
    serial_seen.append(handshake_serial(tls, ca))
    assert serial_seen[0] == first.serial_number and serial_seen[1] != first.serial_number
    assert tls.refresh() is False
    again = ServerTLS.from_ca(ca, "0.0.0.0", ["appliance.home.arpa", "nas.home.arpa"], admin_mtls=False)
    assert again.refresh() is False and handshake_serial(again, ca) != serial_seen[1]  # a new name: a new one


def handshake_serial(tls: ServerTLS, ca: CertificateAuthority) -> int:
    """The serial of the certificate a real TLS handshake with tls's context shows (not verified: the CA's
    clock, not OpenSSL's, has moved)."""

    async def once() -> int:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=tls.ssl_context())
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cadata=ca.ca_pem.decode())
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        server.close()
        return x509.load_der_x509_certificate(der).serial_number

    return asyncio.run(once())


def test_serve_refuses_half_a_pair_and_warns_in_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    base = [sys.executable, "-m", "appliance.cli", "serve", "--no-advertise", "--no-discover"]
    half = subprocess.run([*base, "--tls-cert", str(tmp_path / "c.pem")], capture_output=True, text=True, timeout=120)
    assert half.returncode == 1 and "--tls-cert and --tls-key go together" in half.stderr
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    pair = ["--tls-cert", str(bad), "--tls-key", str(bad)]
    broken = subprocess.run([*base, *pair], capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and "cannot use the TLS certificate" in broken.stderr
    no_model = ["--no-tls", "--model", str(tmp_path / "none.gguf")]
    clear = subprocess.run([*base, *no_model], capture_output=True, text=True, timeout=120)
    assert "WARNING: --no-tls" in clear.stderr and "in clear" in clear.stderr  # 0.0.0.0: the whole LAN
    ca = certificate_authority()
    assert ca.folder == tmp_path / "home" / "pki"
