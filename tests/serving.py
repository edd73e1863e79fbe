"""A real `appliance serve` process on a free loopback port, for the serving tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADMIN_KEY = "admin-test-key"


@dataclass
class Server:
    url: str
    grpc: str
    pid: int


@contextmanager
def running_server(*args: str, key: str = "test-key", timeout: float = 120):
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "appliance.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--api-key",
        key,
        "--admin-key",
        ADMIN_KEY,
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.3)
        yield Server(url, f"127.0.0.1:{grpc_port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
