"""A home LAN in one machine, for offload tests and benchmarks.

Devices are network namespaces on one bridge (addresses from 198.18.0.0/15, the benchmarking
range), links are rate-limited with `tc tbf`, and, because this kernel has no `netem`, delay and
jitter come from a TCP relay: every byte is held for delay +- jitter before it is passed on.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from appliance.launch import free_port


class DelayRelay:
    """Listen on `listen`, forward each connection to `target`, delaying both directions."""

    def __init__(self, target: str, delay_ms: float = 0.0, jitter_ms: float = 0.0, listen: str = "127.0.0.1:0"):
        self.target, self.delay_ms, self.jitter_ms = target, delay_ms, jitter_ms
        self.listen_host, port = listen.rsplit(":", 1)
        self.listen_port = int(port)
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.rng = random.Random(0)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def __enter__(self) -> DelayRelay:
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError(f"relay to {self.target} did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self.stopping = asyncio.Event()
        server = await asyncio.start_server(self._connect, self.listen_host, self.listen_port)
        self.listen_port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stopping.wait()
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            target_r, target_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(self._pump(client_r, target_w, "up"), self._pump(target_r, client_w, "down"))
        except asyncio.CancelledError:  # the relay is shutting down
            client_w.close()
            target_w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        loop, queue, last_due = asyncio.get_running_loop(), asyncio.Queue(), 0.0

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                jitter = self.rng.uniform(-self.jitter_ms, self.jitter_ms)
                last_due = max(last_due, loop.time() + max(self.delay_ms + jitter, 0) / 1e3)  # bytes keep order
                queue.put_nowait((last_due, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0.0, None))
        with suppress(ConnectionError, OSError):
            await sender


@contextmanager
def relay_process(target: str, delay_ms: float = 0.0, jitter_ms: float = 0.0, listen: str = "127.0.0.1:0"):
    """A DelayRelay in a process of its own, so its work never competes with the measured process."""
    cmd = [sys.executable, "-m", "appliance.netsim", target, str(delay_ms), str(jitter_ms), listen]
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


if __name__ == "__main__":  # python -m appliance.netsim TARGET DELAY_MS JITTER_MS LISTEN: a relay until killed
    target, delay, jitter, listen = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])  # for sigwait, in every thread
    with DelayRelay(target, delay, jitter, listen) as relay:
        print(relay.address, flush=True)
        signal.sigwait([signal.SIGTERM, signal.SIGINT])
