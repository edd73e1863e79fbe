"""`appliance bench-serve`: many streaming clients at once against a real server, beside a peer's.

Each server runs as its own process on loopback. At each concurrency level, that many clients
start together, each streaming one completion over the OpenAI API; we record time to first token,
the gaps between tokens, and the aggregate tokens/s over the level's wall time. Our server is measured
twice, in plain HTTP and over TLS (its CA's certificate, as the LAN gets it), and a last table says what
TLS costs: per request (a new connection each, handshake included, and on a kept-alive one) and per token.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console

from appliance.bench.engine import print_table
from appliance.testbed.launch import free_port, running

PROMPTS = [
    "Once upon a time",
    "The history of the bicycle",
    "A recipe for bread:",
    "Dear diary, today",
    "The ocean is",
    "In the year 3000,",
    "My favourite animal is",
    "How to plant a tree:",
]


async def _one(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # every completion is max_tokens long, so the levels compare like with like
    }
    start, stamps, tokens = time.perf_counter(), [], 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # a server that reports no usage in its stream: count its text chunks (one token each for llama.cpp)
    tokens = tokens or len(stamps)
    return {"ttft": stamps[0] - start if stamps else float("nan"), "itl": list(np.diff(stamps)), "tokens": tokens}


LONG_PROMPT_TOKENS = 2000


def long_prompt(path: Path) -> str:
    """A text of about LONG_PROMPT_TOKENS tokens in the model's own vocabulary (both servers read the same file)."""
    from models.gguf_file import open_gguf
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer(open_gguf(path).metadata)
    ids = tokenizer.encode("Every device of the home asks the appliance something now and then. " * 200)
    return tokenizer.decode(ids[:LONG_PROMPT_TOKENS])


async def _level(
    url: str,
    model: str,
    clients: int,
    max_tokens: int,
    long_text: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> dict:
    """`clients` streams started together; with long_text, one more client sends that prompt (non-streamed,
    one token) once the streams are under way, and only the streams are measured."""
    async with httpx.AsyncClient(timeout=600, verify=verify) as http:
        start = time.perf_counter()
        streams = [_one(http, url, model, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens) for i in range(clients)]

        async def long_request() -> None:
            await asyncio.sleep(0.3)
            body = {"model": model, "prompt": long_text, "max_tokens": 1, "temperature": 0}
            (await http.post(f"{url}/v1/completions", json=body)).raise_for_status()

        results = await asyncio.gather(*streams, *([long_request()] if long_text else []))
        results = results[:clients]
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]] or [float("nan")]
    return {
        "clients": clients,
        "tps": sum(r["tokens"] for r in results) / wall,
        "ttft50": np.percentile(ttft, 50),
        "ttft99": np.percentile(ttft, 99),
        "itl50": np.percentile(itl, 50),
        "itl99": np.percentile(itl, 99),
    }


@dataclass
class Subject:
    label: str
    command: list[str]
    url: str
    model: str  # the name its /v1 API knows the model by
    env: dict | None = None
    cafile: Path | None = None  # over TLS: the CA its certificate is checked against
    ours: bool = False
    request_costs: dict = field(default_factory=dict)

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.cafile)) if self.cafile else True


def _ours(path: Path, max_batch: int, tls: bool = False) -> Subject:
    """Our server in plain HTTP, or over TLS with a certificate from a fresh CA (in its own APPLIANCE_HOME)."""
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--model", str(path), "--no-auth"]
    cmd += ["--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port())]
    cmd += ["--max-batch", str(max_batch), "--no-advertise", "--no-discover"]
    if not tls:
        return Subject("appliance", cmd, f"http://127.0.0.1:{port}", path.stem, ours=True)
    home = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    url = f"https://127.0.0.1:{port}"
    return Subject("appliance over TLS", [*cmd, "--tls"], url, path.stem, env, home / "pki" / "ca.pem", ours=True)


REQUESTS = 40  # per kind, for the per-request cost of TLS


def _request_costs(subject: Subject) -> dict:
    """Milliseconds per request, p50 over REQUESTS sequential ones: `GET /v2/health/ready` on a new
    connection each (TCP and, over TLS, the handshake) and on one kept-alive connection, and a 1-token
    completion on a kept-alive connection."""
    verify = subject.verify()

    def timed(call) -> float:
        times = []
        for _ in range(REQUESTS):
            start = time.perf_counter()
            call().raise_for_status()
            times.append(time.perf_counter() - start)
        return float(np.percentile(times, 50) * 1e3)

    body = {"model": subject.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    with httpx.Client(verify=verify, timeout=60) as kept:
        return {
            "new": timed(lambda: httpx.get(f"{subject.url}/v2/health/ready", verify=verify)),
            "kept": timed(lambda: kept.get(f"{subject.url}/v2/health/ready")),
            "token": timed(lambda: kept.post(f"{subject.url}/v1/completions", json=body)),
        }


def _llama_server(path: Path, max_batch: int, binary: Path) -> Subject:
    """llama.cpp's own server, continuous batching over max_batch slots sharing one KV pool of 8192 tokens
    (-kvu: a slot takes what its sequence needs, as our per-session caches do), on every core."""
    port = free_port()
    cmd = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(os.cpu_count())]
    cmd += ["-np", str(max_batch), "-c", "8192", "-kvu", "--cont-batching", "--no-webui"]
    return Subject("llama.cpp llama-server", cmd, f"http://127.0.0.1:{port}", path.name)


def _llama_cpp_python(path: Path) -> Subject:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_threads", str(os.cpu_count()), "--n_ctx", "4096"]
    # by default a new request cuts off the one streaming; queue them instead, as a user would want
    cmd += ["--interrupt_requests", "False"]
    return Subject("llama-cpp-python server (no batching)", cmd, f"http://127.0.0.1:{port}", path.name)


def _subjects(path: Path, peers: bool, max_batch: int, llama_bin: Path) -> list[Subject]:
    """Us, and each peer that is installed (a missing one is said on stderr)."""
    subjects = [_ours(path, max_batch), _ours(path, max_batch, tls=True)]
    if not peers:
        return subjects
    say = Console(stderr=True).print
    if (llama_bin / "llama-server").exists():
        subjects.append(_llama_server(path, max_batch, llama_bin / "llama-server"))
    else:
        say(f"llama-server not measured: no {llama_bin / 'llama-server'} (make bench-serve builds it)")
    try:
        import llama_cpp.server  # noqa: F401

        subjects.append(_llama_cpp_python(path))
    except ImportError as e:
        say(f"llama-cpp-python's server not measured: {e} (make bench-serve installs llama-cpp-python[server])")
    return subjects


def _backend(subject: Subject) -> str:
    """What our server really runs, from its /metrics (appliance_backend_info)."""
    for line in httpx.get(subject.url + "/metrics", timeout=10, verify=subject.verify()).text.splitlines():
        if line.startswith("appliance_backend_info{"):
            return line.split('description="', 1)[1].split('"', 1)[0]
    return "backend unknown"


def run_bench_serve(
    path: Path,
    levels: list[int],
    max_tokens: int,
    peers: bool = True,
    max_batch: int = 16,
    llama_bin: Path | None = None,
) -> list[dict]:
    """Each subject in turn: every level without and with a long prompt arriving, in one run."""
    llama_bin = llama_bin or Path(sys.prefix) / "llama-rpc"
    long_text, rows = long_prompt(path), []
    subjects = _subjects(path, peers, max_batch, llama_bin)
    for subject in subjects:
        with ExitStack() as stack:
            try:
                health = f"{subject.url}/v1/models"
                stack.enter_context(running(subject.command, health, env=subject.env, cafile=subject.cafile))
            except (RuntimeError, TimeoutError) as e:  # a peer that will not start: say so, keep our figures
                Console(stderr=True).print(f"{subject.label} not measured: {e}")
                continue
            label = f"{subject.label} ({_backend(subject)})" if subject.ours else subject.label
            verify = subject.verify()
            asyncio.run(_level(subject.url, subject.model, 1, 4, verify=verify))  # warm up
            if subject.ours:
                subject.request_costs = _request_costs(subject)
            for clients in levels:
                for extra in (None, long_text):
                    row = {"system": label, "long": extra is not None, "clients": clients, "tls": bool(subject.cafile)}
                    try:
                        row |= asyncio.run(_level(subject.url, subject.model, clients, max_tokens, extra, verify))
                    except httpx.HTTPError as e:  # a server that fails under load is a result too
                        Console(stderr=True).print(f"{label} at {clients} clients failed: {e!r}")
                        nan = float("nan")
                        row |= {"system": f"{label} (FAILED)", "tps": nan, "ttft50": nan, "ttft99": nan}
                        row |= {"itl50": nan, "itl99": nan}
                    rows.append(row)
    _print(path, rows, max_tokens)
    _print_tls_cost(subjects, rows)
    return rows


def _print_tls_cost(subjects: list[Subject], rows: list[dict]) -> None:
    """TLS against plain HTTP, both our server in this run: per request and per streamed token."""
    measured = {bool(s.cafile): s for s in subjects if s.ours and s.request_costs}
    if len(measured) < 2:
        return
    plain, tls = measured[False], measured[True]
    kinds = {
        "new": "ms per GET /v2/health/ready, new connection each",
        "kept": "ms per GET /v2/health/ready, kept alive",
        "token": "ms per 1-token completion, kept alive",
    }
    table = []
    for key, what in kinds.items():
        a, b = plain.request_costs[key], tls.request_costs[key]
        table.append([what, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"])
    streams = {(r["tls"], r["clients"]): r for r in rows if "tls" in r and not r["long"]}
    for clients in sorted({c for _, c in streams}):
        a, b = streams.get((False, clients)), streams.get((True, clients))
        if a and b:
            ms = (a["itl50"] * 1e3, b["itl50"] * 1e3)
            streaming = f"{clients} streaming client(s)"
            table.append([f"ITL p50 ms, {streaming}", f"{ms[0]:.2f}", f"{ms[1]:.2f}", f"{ms[1] - ms[0]:+.2f}"])
            change = (b["tps"] / a["tps"] - 1) * 100
            table.append([f"tokens/s, {streaming}", f"{a['tps']:.1f}", f"{b['tps']:.1f}", f"{change:+.1f}%"])
    print_table(
        f"what TLS costs (our server, plain HTTP vs TLS, same run; requests: p50 of {REQUESTS})",
        ["measure", "plain", "TLS", "TLS adds"],
        table,
    )


def _print(path: Path, rows: list[dict], max_tokens: int) -> None:
    """Two tables: the plain levels with each system's ratio to llama-server at the same level, then
    the streams' latency while a long prompt arrives."""
    peer = {r["clients"]: r for r in rows if r["system"].startswith("llama.cpp llama-server") and not r["long"]}
    plain, long_rows = [r for r in rows if not r["long"]], [r for r in rows if r["long"]]

    def vs(r: dict, key: str) -> str:
        p = peer.get(r["clients"])
        return f"{r[key] / p[key]:.2f}x" if p and p[key] else "-"

    print_table(
        f"{path.name}: streaming completions of {max_tokens} tokens, {os.cpu_count()} CPU threads",
        ["system", "clients", "tokens/s", "vs llama-server", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
         "ITL p99/p50"],
        [
            [r["system"], str(r["clients"]), f"{r['tps']:.1f}", vs(r, "tps"), f"{r['ttft50'] * 1e3:.0f}",
             f"{r['ttft99'] * 1e3:.0f}", f"{r['itl50'] * 1e3:.1f}", f"{r['itl99'] * 1e3:.1f}",
             f"{r['itl99'] / r['itl50']:.1f}"]
            for r in plain
        ],
    )  # fmt: skip
    by_level = {(r["system"], r["clients"]): r for r in plain}
    print_table(
        f"the same streams while one more client sends a {LONG_PROMPT_TOKENS}-token prompt",
        ["system", "clients", "ITL p50 ms", "ITL p99 ms", "p99 / p50", "p99 without it ms", "TTFT p99 ms"],
        [
            [r["system"], str(r["clients"]), f"{r['itl50'] * 1e3:.1f}", f"{r['itl99'] * 1e3:.1f}",
             f"{r['itl99'] / r['itl50']:.1f}", f"{by_level.get((r['system'], r['clients']), r)['itl99'] * 1e3:.1f}",
             f"{r['ttft99'] * 1e3:.0f}"]
            for r in long_rows
        ],
    )  # fmt: skip
