"""A home LAN in one machine, for offload tests and benchmarks.

Devices are network namespaces on one bridge (addresses from 198.18.0.0/15, the benchmarking
range), links are rate-limited with `tc tbf`, and, because this kernel has no `netem`, delay and
jitter come from a TCP relay: every byte is held for delay +- jitter before it is passed on.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from appliance.testbed.launch import free_port


class DelayRelay:
    """Listen on `listen`, forward each connection to `target`, delaying both directions.

    Threads, not an event loop: a thread sleeps to each chunk's due time with nanosleep, where an
    event loop's millisecond epoll timeouts overshot by ~0.5 ms per pass.
    """

    def __init__(self, target: str, delay_ms: float = 0.0, jitter_ms: float = 0.0, listen: str = "127.0.0.1:0"):
        self.target, self.delay_ms, self.jitter_ms = target, delay_ms, jitter_ms
        host, port = listen.rsplit(":", 1)
        self.listener = socket.create_server((host, int(port)))
        self.listen_host, self.listen_port = host, self.listener.getsockname()[1]
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.rng = random.Random(0)
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def __enter__(self) -> DelayRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for sock in [self.listener, *self.sockets]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        host, port = self.target.rsplit(":", 1)
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # the listener was closed: the relay is shutting down
                return
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:  # the target is gone: so is this connection
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(sock)
            self._pump(client, upstream, "up")
            self._pump(upstream, client, "down")

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        """One direction of a connection: a reader stamps each chunk with its due time, a writer
        sends it then; bytes keep their order even with jitter."""
        chunks: queue.SimpleQueue = queue.SimpleQueue()

        def read() -> None:
            last_due = 0.0
            with suppress(OSError):
                while data := source.recv(1 << 16):
                    with self.lock:
                        if direction == "up":
                            self.bytes_up += len(data)
                        else:
                            self.bytes_down += len(data)
                    jitter = self.rng.uniform(-self.jitter_ms, self.jitter_ms)
                    last_due = max(last_due, time.monotonic() + max(self.delay_ms + jitter, 0) / 1e3)
                    chunks.put((last_due, data))
            chunks.put((0.0, None))

        def write() -> None:
            with suppress(OSError):
                while (item := chunks.get())[1] is not None:
                    due, data = item
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    sink.sendall(data)
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


@contextmanager
def relay_process(target: str, delay_ms: float = 0.0, jitter_ms: float = 0.0, listen: str = "127.0.0.1:0"):
    """A DelayRelay in a process of its own, so its work never competes with the measured process."""
    cmd = [sys.executable, "-m", "appliance.testbed.netsim", target, str(delay_ms), str(jitter_ms), listen]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"relay to {target} did not start")
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Lan:
    """A bridge on this host (the appliance's side) and one namespace per device."""

    prefix: str = "apl"
    host_address: str = "198.18.0.1"
    devices: dict[str, str] = field(default_factory=dict)  # namespace -> address

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextmanager
def home_lan(n_devices: int, rate: str | None = None, prefix: str = "apl") -> Iterator[Lan]:
    """n namespaces on a bridge with the host at 198.18.0.1; each device link limited to `rate` (tbf)."""
    lan = Lan(prefix)
    links = [f"{prefix}v{i}a" for i in range(1, n_devices + 1)]
    _remove(lan.bridge, links, [f"{prefix}ns{i}" for i in range(1, n_devices + 1)])  # left by a killed run
    try:
        _ip("link", "add", lan.bridge, "type", "bridge")
        _ip("addr", "add", f"{lan.host_address}/24", "dev", lan.bridge)
        _ip("link", "set", lan.bridge, "up")
        for i in range(1, n_devices + 1):
            ns, outside, inside, address = f"{prefix}ns{i}", f"{prefix}v{i}a", f"{prefix}v{i}b", f"198.18.0.{i + 1}"
            _ip("netns", "add", ns)
            lan.devices[ns] = address
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", lan.bridge)
            _ip("link", "set", outside, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
            _ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if rate:
                for cmd in ([], ["ip", "netns", "exec", ns]):  # both directions of the device's link
                    dev = outside if not cmd else inside
                    subprocess.run(
                        [*cmd, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                         "latency", "100ms"],
                        check=True, capture_output=True,
                    )  # fmt: skip
        yield lan
    finally:
        _remove(lan.bridge, links, list(lan.devices))


def _remove(bridge: str, links: list[str], namespaces: list[str]) -> None:
    for link in [*links, bridge]:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def can_build_lan() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`), or None when they can."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "the `ip` and `tc` tools are missing (iproute2)"
    return None


# -- worker processes on the simulated LAN ---------------------------------------------------
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


def wait_listening(host: str, port: int, proc: subprocess.Popen, log=None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = ""
            if log is not None:
                log.seek(0)
                said = log.read()[-2000:]
            raise RuntimeError(f"worker exited with {proc.returncode}: {said}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"worker did not listen on {host}:{port} within {timeout:.0f} s")


@contextmanager
def worker_process(
    home: Path,
    budget: str = "210MB",
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    extra: tuple[str, ...] = (),
    backend: str = "numpy",
) -> Iterator[Worker]:
    """A worker process; NumPy by default, so its layers compute exactly as an all-local reference engine's."""
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
        "--backend",
        backend,
        *extra,
    ]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  closed below; a pipe nobody reads would stall a worker
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    try:
        wait_listening(host, port, proc, log)
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
        log.close()


if __name__ == "__main__":  # python -m appliance.testbed.netsim TARGET DELAY_MS JITTER_MS LISTEN: a relay until killed
    target, delay, jitter, listen = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])  # for sigwait, in every thread
    with DelayRelay(target, delay, jitter, listen) as relay:
        print(relay.address, flush=True)
        signal.sigwait([signal.SIGTERM, signal.SIGINT])
