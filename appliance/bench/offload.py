"""`appliance bench-offload`: the model split over workers, beside llama.cpp's RPC backend, same links.

The default backend (the C kernels), one thread per process. Placements: all local; the appliance
(embedding, head, the first layers its 40 MB budget holds) plus one worker; plus two workers. Links:
loopback, then a delaying relay of d ms one way in front of every worker (the same relay in front of
llama.cpp's `ggml-rpc-server`s). For 1, 4 and 8 clients decoding together (one batched step, as the
scheduler runs them), with speculative decoding (prompt-lookup drafts) on and off, on repetitive
text (a chat turn asking to repeat code): aggregate tokens/s, ms per token per client, the ms per
token added over all-local with the same clients and drafts, LAN round trips per token (a step's
sessions travel together: one per step), draft acceptance (drafted tokens the model kept), and the
time per step waiting on the chain rather than computing, against the non-speculative floor
(N + 1) x d. llama.cpp's figures are llama-bench's (one client, no drafts). Last: how soon a worker
that holds the model file is ready (it reads its layers itself) beside one the weights are shipped
to, and the transports' own floor.
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

from appliance.bench.engine import print_table
from appliance.bench.transport_floor import measure_floor
from appliance.startup import coordinator_for, load_engine
from appliance.testbed.launch import free_port
from appliance.testbed.netsim import relay_process, wait_listening, worker_process
from models.engine import Engine
from models.gguf_file import open_gguf
from models.llama import Llama
from models.speculative import speculation_for
from offload.client import WorkerClient
from offload.pki import certificate_authority, issue_identity

BACKEND = "cpu"
APPLIANCE_BUDGET = "40MB"  # C kernels' sizes (the file's blocks): 30 MB embedding and head, and 3 layers
PLACEMENTS = {1: ["100MB"], 2: ["45MB", "45MB"]}  # workers' budgets: the 2-worker case must split
WORKER_ARGS = ("--threads", "1")
REPEAT = (
    "Repeat this code exactly:\n"
    "def add(a, b):\n    return a + b\n\n"
    "def sub(a, b):\n    return a - b\n\n"
    "def mul(a, b):\n    return a * b\n\n"
    "def div(a, b):\n    return a / b\n"
)
err = Console(stderr=True, highlight=False)


@dataclass
class Row:
    system: str
    workers: int
    delay_ms: float
    clients: int
    drafts: bool
    ttft_ms: float
    ms_per_token: float  # per client: decode wall time over its tokens
    tokens_per_s: float  # all clients together
    round_trips: float | None = None  # LAN round trips per token (per client)
    acceptance: float | None = None
    wire_ms: float | None = None
    split: str = ""
    base_ms: float | None = None  # all-local ms per token, same clients and drafts


def measure(engine: Engine, ids: list[int], n_decode: int, clients: int = 1) -> dict:
    """`clients` generations of the same prompt decoded together: time to first token (prefill of
    one), ms per token per client, aggregate tokens/s, round trips and acceptance, from the median
    (by ms per token) of three runs after a warm-up run (this machine is shared: single runs swing)."""
    runs = []
    for _ in range(4):
        coordinator = engine.offload
        if coordinator is not None:
            coordinator.overhead_ms.clear()
        gens = [engine.generate(ids, max_tokens=n_decode + 1, ignore_eos=True) for _ in range(clients)]
        start = time.perf_counter()
        for gen in gens:
            gen.step()  # the prompt, and the first token
        ttft = (time.perf_counter() - start) * 1e3 / clients
        start, made = time.perf_counter(), sum(g.completion_tokens for g in gens)
        if coordinator is not None:
            trips = coordinator.round_trips
        while live := [g for g in gens if not g.done]:
            batch = [g.next_input() for g in live]
            logits, hiddens = engine.step(batch, [g.session for g in live])
            for g, ids_, row, hidden in zip(live, batch, logits, hiddens, strict=True):
                g.advance(len(ids_), row, hidden)
        seconds = time.perf_counter() - start
        tokens = sum(g.completion_tokens for g in gens) - made
        drafted = sum(g.drafting.drafted for g in gens if g.drafting)
        accepted = sum(g.drafting.accepted for g in gens if g.drafting)
        out: dict = {
            "ttft_ms": ttft,
            "ms_per_token": seconds * 1e3 / (tokens / clients),
            "tokens_per_s": tokens / seconds,
            "acceptance": accepted / drafted if drafted else None,
        }
        if coordinator is not None:
            out["round_trips"] = (coordinator.round_trips - trips) / (tokens / clients)
            out["wire_ms"] = statistics.median(coordinator.overhead_ms) if coordinator.overhead_ms else None
        runs.append(out)
    return sorted(runs[1:], key=lambda r: r["ms_per_token"])[1]


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


def run_bench_offload(
    path: Path,
    n_prompt: int,
    n_decode: int,
    delays: list[float],
    llama_bin: Path | None,
    clients: list[int] | None = None,
    workers: list[int] | None = None,
) -> None:
    os.environ["APPLIANCE_HOME"] = tempfile.mkdtemp(prefix="bench-offload-")
    clients = clients or [1, 4, 8]
    ca = certificate_authority()
    local = load_engine(path, BACKEND, threads=1)
    spec = speculation_for("lookup")  # all local, auto does not draft: measured both ways here
    ids = local.prompt_ids(REPEAT, chat=True)
    n_layers = local.model.config.n_layers
    rows, base = [], {}
    for n in clients:
        for drafts in (False, True):
            local.speculation = spec if drafts else None
            figures = measure(local, ids, n_decode, n)
            base[n, drafts] = figures["ms_per_token"]
            rows.append(Row("appliance", 0, 0.0, n, drafts, **figures))
    peer = llama_bin if llama_bin and (llama_bin / "llama-bench").is_file() else None
    if llama_bin and not peer:
        err.print(f"llama.cpp RPC peer not measured: no llama-bench in {llama_bin} (make bench-offload builds it)")
    if peer:
        ttft, ms, _ = llama_bench(peer, path, n_prompt, n_decode, [], 0, "")
        rows.append(Row("llama.cpp", 0, 0.0, 1, False, ttft, ms, 1e3 / ms))
    home = Path(os.environ["APPLIANCE_HOME"])
    relay_ms = 0.0
    for n_workers, budgets in PLACEMENTS.items():
        if workers and n_workers not in workers:
            continue
        with ExitStack() as stack:
            procs = []
            for i, budget in enumerate(budgets):
                issue_identity(ca, home / f"w{i}", f"w{i}")
                procs.append(stack.enter_context(worker_process(home / f"w{i}", budget, backend=BACKEND,
                                                                extra=WORKER_ARGS)))  # fmt: skip
            servers = [stack.enter_context(rpc_server(peer)) for _ in budgets] if peer else []
            for delay in delays:
                with ExitStack() as links:
                    ours = [links.enter_context(relay_process(w.address, delay)) if delay else w.address
                            for w in procs]  # fmt: skip
                    theirs = [links.enter_context(relay_process(s, delay)) if delay else s for s in servers]
                    engine = load_engine(path, BACKEND, APPLIANCE_BUDGET, ours, threads=1)
                    spec = engine.speculation
                    plan = engine.offload.make_plan()
                    split = "/".join(str(s.stop - s.start) for s in plan.chain)
                    for n in clients:
                        for drafts in (False, True):
                            engine.speculation = spec if drafts else None
                            figures = measure(engine, ids, n_decode, n)
                            rows.append(Row("appliance", n_workers, delay, n, drafts, **figures, split=split,
                                            base_ms=base[n, drafts]))  # fmt: skip
                    if peer:
                        ngl = n_layers - plan.local.stop
                        ttft, ms, _ = llama_bench(peer, path, n_prompt, n_decode, theirs, ngl, split)
                        peer_base = llama_bench(peer, path, n_prompt, n_decode, [], 0, "")[1]
                        rows.append(Row("llama.cpp RPC", n_workers, delay, 1, False, ttft, ms, 1e3 / ms, split=split,
                                        base_ms=peer_base))  # fmt: skip
                    for s in plan.chain:
                        engine.offload.drop_worker(s.device.address)
                    engine.offload.close()
            if n_workers == 1:
                relay_ms = _relay_cost(procs[0].address)
    _print(rows, path, n_decode)
    print(f"the delaying relay itself adds {relay_ms:.2f} ms per one-way trip (a 0 ms relay vs direct, health calls)")
    _own_copy(path, ca, home)
    hidden_bytes = local.model.config.dim * 4
    floor = measure_floor(hidden_bytes, ca.identity(), issue_identity(ca, home / "echo", "echo"))
    print(
        f"transport floor, one {hidden_bytes}-byte hidden state to an echo process and back after 23 ms idle: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in floor.items())
    )


def _own_copy(path: Path, ca, home: Path) -> None:
    """A worker holding the model file (`--model`) against one without: seconds from being offered to
    having its layers loaded, and the bytes shipped to it."""
    model = Llama.load(str(path), BACKEND, 1)
    for name, extra in (("own copy", ("--model", str(path))), ("shipped", ())):
        folder = home / f"own-{len(extra)}"
        issue_identity(ca, folder, folder.name)
        with worker_process(folder, "100MB", backend=BACKEND, extra=(*WORKER_ARGS, *extra)) as w:
            start = time.perf_counter()
            coordinator = coordinator_for(model, APPLIANCE_BUDGET, [w.address])
            plan, _ = coordinator.current_plan()
            ready = time.perf_counter() - start
            client = coordinator.workers[w.address][0]
            print(
                f"worker ({name}): layers [{plan.chain[0].start}, {plan.chain[0].stop}) ready {ready:.2f} s after "
                f"it was offered, {client.shipped_bytes / 1e6:.1f} MB shipped"
            )
            coordinator.close()


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


def _print(rows: list[Row], path: Path, n_decode: int) -> None:
    table = []
    for r in rows:
        added = r.ms_per_token - r.base_ms if r.base_ms is not None else None
        floor = (r.workers + 1) * r.delay_ms if r.workers else None
        table.append(
            [
                r.system,
                "all local" if not r.workers else f"{r.workers}w: {r.split}",
                "-" if not r.workers else ("loopback" if not r.delay_ms else f"{r.delay_ms:g} ms"),
                str(r.clients),
                "on" if r.drafts else "off",
                f"{r.ttft_ms:.1f}",
                f"{r.tokens_per_s:.1f}",
                f"{r.ms_per_token:.2f}",
                f"{added:+.2f}" if added is not None else "-",
                f"{r.round_trips:.2f}" if r.round_trips is not None else "-",
                f"{r.acceptance:.0%}" if r.acceptance is not None else "-",
                f"{r.wire_ms:.2f}" if r.wire_ms is not None else "-",
                f"{floor:.1f}" if floor is not None else "-",
            ]
        )
    print_table(
        f"{open_gguf(path).path.name}: a chat turn repeating code, {n_decode} decoded per client, C kernels, "
        f"1 thread per process, appliance budget {APPLIANCE_BUDGET}",
        ["system", "placement", "delay", "clients", "drafts", "TTFT ms", "tok/s", "ms/token", "added ms/tok",
         "trips/tok", "accepted", "wire ms/step", "(N+1)d"],
        table,
    )  # fmt: skip
