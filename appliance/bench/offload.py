"""`appliance bench-offload`: the model split over workers, beside llama.cpp's RPC backend, same links.

Placements: all local; the appliance (embedding, head, the first layers its 190 MB budget holds) plus
one worker; plus two workers. Links: loopback, then a delaying relay of d ms one way in front of
every worker (the same relay in front of llama.cpp's `ggml-rpc-server`s). Every process computes
on one thread. Figures per placement: time to first token, decode ms per token (median step), the
time per token added over all-local measured just before it (a difference of two ~35 ms figures,
so still noisy by a millisecond or so), and for us
the median time per token spent waiting on the chain but not computing (the workers report their
compute time in each message), against our bound (N + 1) x d + 0.3 ms. Last, the transports' own
floor: one hidden state's round trip over plain TCP, TCP with mutual TLS, and our gRPC stream.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from appliance.bench.engine import FILLER, print_table
from appliance.bench.transport_floor import measure_floor
from appliance.startup import load_engine
from appliance.testbed.launch import free_port
from appliance.testbed.netsim import relay_process, wait_listening, worker_process
from models.engine import Engine
from models.gguf_file import open_gguf
from offload.client import WorkerClient
from offload.pki import certificate_authority, issue_identity

APPLIANCE_BUDGET = "190MB"
PLACEMENTS = {1: ["420MB"], 2: ["210MB", "210MB"]}  # workers' budgets: the 2-worker case must split
err = Console(stderr=True, highlight=False)


@dataclass
class Row:
    system: str
    workers: int
    delay_ms: float
    ttft_ms: float
    ms_per_token: float
    wire_ms: float | None = None
    split: str = ""
    base_ms: float | None = None  # all-local ms per token, measured right before this placement


def measure(engine: Engine, ids: list[int], n_decode: int) -> tuple[float, float, float | None]:
    """(time to first token, median decode step, median time per token on the wire and in gRPC rather
    than computing) in ms, over three runs after a warm-up run."""
    steps, ttfts = [], []
    for run in range(4):
        if run == 1:
            steps.clear()
            ttfts.clear()
            if engine.offload is not None:
                engine.offload.overhead_ms.clear()
        gen = engine.generate(ids, max_tokens=n_decode + 1, ignore_eos=True)
        start = time.perf_counter()
        gen.advance(len(ids), engine.next_logits(ids, gen.session))
        ttfts.append((time.perf_counter() - start) * 1e3)
        while not gen.done:
            t = time.perf_counter()
            gen.advance(1, engine.next_logits(gen.next_input(), gen.session))
            steps.append((time.perf_counter() - t) * 1e3)
    wire = statistics.median(engine.offload.overhead_ms) if engine.offload is not None else None
    return statistics.median(ttfts), statistics.median(steps), wire


def llama_bench(
    binaries: Path, model: Path, n_prompt: int, n_decode: int, rpc: list[str], ngl: int, split: str
) -> tuple[float, float, None]:
    """llama.cpp's own llama-bench: (TTFT ms, ms per token) on one thread, layers [n - ngl, n) over RPC."""
    cmd = [str(binaries / "llama-bench"), "-m", str(model), "-p", str(n_prompt), "-n", str(n_decode), "-t", "1",
           "-r", "3", "-o", "json", "-ngl", str(ngl)]  # fmt: skip
    if rpc:
        cmd += ["--rpc", ",".join(rpc), "-ts", split]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-500:]}")
    results = json.loads(out.stdout)
    pp = next(r for r in results if r["n_prompt"] > 0 and r["n_gen"] == 0)["avg_ts"]
    tg = next(r for r in results if r["n_gen"] > 0)["avg_ts"]
    return n_prompt / pp * 1e3 + 1e3 / tg, 1e3 / tg, None


def run_bench_offload(path: Path, n_prompt: int, n_decode: int, delays: list[float], llama_bin: Path | None) -> None:
    os.environ["APPLIANCE_HOME"] = tempfile.mkdtemp(prefix="bench-offload-")
    ca = certificate_authority()
    local = Engine.load(path, "numpy")  # the split runs the NumPy reference: its budgets are float32 sizes
    ids = local.tokenizer.encode(FILLER * (1 + n_prompt // 30))[:n_prompt]
    n_layers = local.model.config.n_layers
    rows = [Row("appliance", 0, 0.0, *measure(local, ids, n_decode))]
    peer = llama_bin if llama_bin and (llama_bin / "llama-bench").is_file() else None
    if llama_bin and not peer:
        err.print(f"llama.cpp RPC peer not measured: no llama-bench in {llama_bin} (make bench-offload builds it)")
    if peer:
        rows.append(Row("llama.cpp", 0, 0.0, *llama_bench(peer, path, n_prompt, n_decode, [], 0, "")))
    home = Path(os.environ["APPLIANCE_HOME"])
    relay_ms = 0.0
    for n_workers, budgets in PLACEMENTS.items():
        with ExitStack() as stack:
            workers = []
            for i, budget in enumerate(budgets):
                issue_identity(ca, home / f"w{i}", f"w{i}")
                workers.append(stack.enter_context(worker_process(home / f"w{i}", budget)))
            servers = [stack.enter_context(rpc_server(peer)) for _ in budgets] if peer else []
            for delay in delays:
                with ExitStack() as links:
                    ours = [links.enter_context(relay_process(w.address, delay)) if delay else w.address
                            for w in workers]  # fmt: skip
                    theirs = [links.enter_context(relay_process(s, delay)) if delay else s for s in servers]
                    engine = load_engine(path, "numpy", APPLIANCE_BUDGET, ours)
                    plan = engine.offload.make_plan()
                    layers = [s.stop - s.start for s in plan.chain]
                    split = "/".join(str(n) for n in layers)
                    base = measure(local, ids, n_decode)[1]
                    figures = measure(engine, ids, n_decode)
                    rows.append(Row("appliance", n_workers, delay, *figures, split, base))
                    if peer:
                        ngl = n_layers - plan.local.stop
                        base = llama_bench(peer, path, n_prompt, n_decode, [], 0, "")[1]
                        figures = llama_bench(peer, path, n_prompt, n_decode, theirs, ngl, split)
                        rows.append(Row("llama.cpp RPC", n_workers, delay, *figures, split, base))
                    for s in plan.chain:
                        engine.offload.drop_worker(s.device.address)
            if n_workers == 1:
                relay_ms = _relay_cost(workers[0].address)
    _print(rows, path, n_prompt, n_decode)
    print(f"the delaying relay itself adds {relay_ms:.2f} ms per one-way trip (a 0 ms relay vs direct, health calls)")
    hidden_bytes = local.model.config.dim * 4
    floor = measure_floor(hidden_bytes, ca.identity(), issue_identity(ca, home / "echo", "echo"))
    print(
        f"transport floor, one {hidden_bytes}-byte hidden state to an echo process and back after 23 ms idle: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in floor.items())
    )


def _relay_cost(address: str) -> float:
    """What one pass through a DelayRelay costs beyond its set delay: half the round-trip difference."""
    identity = certificate_authority().identity()

    def rtt(target: str) -> float:
        client = WorkerClient(target, identity)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            client.healthy(timeout=5)
            times.append((time.perf_counter() - t) * 1e3)
        client.close()
        return statistics.median(times)

    with relay_process(address, 0) as relay:
        return (rtt(relay) - rtt(address)) / 2


@contextmanager
def rpc_server(binaries: Path) -> Iterator[str]:
    """One ggml-rpc-server on a free loopback port, computing on one thread."""
    port = free_port()
    cmd = [str(binaries / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # no pipe left unread
    try:
        wait_listening("127.0.0.1", port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _print(rows: list[Row], path: Path, n_prompt: int, n_decode: int) -> None:
    table = []
    for r in rows:
        added = r.ms_per_token - r.base_ms if r.workers else 0.0
        bound = (r.workers + 1) * r.delay_ms + 0.3 if r.workers and r.system == "appliance" else None
        table.append(
            [
                r.system,
                "all local" if not r.workers else f"{r.workers}w: {r.split}",
                "-" if not r.workers else ("loopback" if not r.delay_ms else f"{r.delay_ms:g} ms"),
                f"{r.ttft_ms:.1f}",
                f"{1e3 / r.ms_per_token:.1f}",
                f"{r.ms_per_token:.2f}",
                f"{added:+.2f}" if r.workers else "-",
                f"{r.wire_ms:.2f}" if r.wire_ms is not None else "-",
                f"{bound:.2f}" if bound is not None else "-",
            ]
        )
    print_table(
        f"{open_gguf(path).path.name}: {n_prompt}-token prompt, {n_decode} decoded, 1 thread per process, "
        f"appliance budget {APPLIANCE_BUDGET}",
        [
            "system",
            "placement",
            "delay",
            "TTFT ms",
            "tok/s",
            "ms/token",
            "added ms/tok",
            "wire ms/tok",
            "(N+1)d+0.3",
        ],
        table,
    )
