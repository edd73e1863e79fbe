"""Starting a server process and waiting until it answers: for benchmarks and tests."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    cmd: list[str],
    health_url: str,
    env: dict | None = None,
    timeout: float = 180,
    log_path: Path | None = None,
    cafile: Path | None = None,
) -> Iterator[int]:
    """Run cmd until the with-block ends; yields its pid once health_url answers 200 (an https:// one
    checked against `cafile`, the appliance's CA, which the server writes as it starts).

    Its stderr goes to a file (a pipe nobody reads would stall a chatty server once full): log_path, to
    read it afterwards, else a temporary one.
    """
    with open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}: {log.read()[-2000:]}")
                try:
                    if cafile is None or cafile.is_file():
                        verify = ssl.create_default_context(cafile=str(cafile)) if cafile else True
                        if httpx.get(health_url, timeout=1, verify=verify).status_code == 200:
                            break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{' '.join(cmd[:4])} did not answer {health_url} within {timeout:.0f} s")
                time.sleep(0.3)
            yield proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def bench_server(model: Path) -> Iterator[tuple[int, int]]:
    """The appliance serving `model` on loopback without auth or discovery, for the load tools
    (perf_analyzer, aiperf): yields its HTTP and gRPC ports once it answers."""
    http, grpc = free_port(), free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http)]
    cmd += ["--grpc-port", str(grpc), "--no-auth", "--no-advertise", "--no-discover", "--model", str(model)]
    with running(cmd, f"http://127.0.0.1:{http}/health"):
        yield http, grpc
