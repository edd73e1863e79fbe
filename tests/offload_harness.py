"""Real worker processes for offload tests: certificates from a real CA, real ports, real mTLS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from offload.pki import CertificateAuthority, Identity, key_pem, new_key, signing_request


def issue_identity(ca: CertificateAuthority, home: Path, name: str) -> Identity:
    """What pairing leaves on a worker (the pairing flow itself is tested on its own)."""
    key = new_key()
    identity = Identity(key_pem(key), ca.sign(signing_request(key, name)), ca.ca_pem)
    identity.save(home, "worker")
    return identity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Worker:
    address: str
    proc: subprocess.Popen
    home: Path

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"worker did not listen on {host}:{port} within {timeout:.0f} s")


@contextmanager
def worker_process(
    home: Path,
    budget: str = "60MB",
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[Worker]:
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "offload.worker",
        "--host",
        host,
        "--port",
        str(port),
        "--home",
        str(home),
        "--memory-budget",
        budget,
        "--no-advertise",
        *extra,
    ]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_listening(host, port, proc)
        yield Worker(f"{host}:{port}", proc, home)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
