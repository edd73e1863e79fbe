"""A real `appliance serve` process on free loopback ports, for the serving tests."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.testbed.launch import free_port, running
from models.store import default_root

ADMIN_KEY = "admin-test-key"


@dataclass
class Server:
    url: str
    grpc: str
    pid: int
    ca: Path | None = None  # with tls: the appliance's CA certificate, which clients trust

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify` for this server: only its CA (with tls)."""
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True


def serve_command(http_port: int, grpc_port: int, key: str, admin_key: str, *args: str) -> list[str]:
    """`appliance serve` on loopback at these ports with these keys (a fresh process: `python -m`)."""
    return [
        *(sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1"),
        *("--http-port", str(http_port), "--grpc-port", str(grpc_port), "--api-key", key, "--admin-key", admin_key),
        *args,
    ]


@contextmanager
def running_server(
    *args: str, key: str = "test-key", log_path: Path | None = None, tls: bool = False
) -> Iterator[Server]:
    """`log_path`: where the server's stderr goes, to read it afterwards; `tls`: HTTPS and gRPC over TLS
    with a certificate from the CA in $APPLIANCE_HOME/pki."""
    port, grpc_port = free_port(), free_port()
    cmd = serve_command(port, grpc_port, key, ADMIN_KEY, *args, *(["--tls"] if tls else []))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    ca = default_root().parent / "pki" / "ca.pem" if tls else None
    with running(cmd, f"{url}/health", log_path=log_path, cafile=ca) as pid:
        yield Server(url, f"127.0.0.1:{grpc_port}", pid, ca)
