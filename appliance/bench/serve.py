"""`appliance bench-serve`: many streaming clients at once against a real server, beside a peer's.

Each server runs as its own process on loopback. At each concurrency level, that many clients
start together, each streaming one completion over the OpenAI API; we record time to first token,
the gaps between tokens, and the aggregate tokens/s over the level's wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console

from appliance.bench.engine import print_table
from appliance.bench.launch import free_port, running

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


async def _level(url: str, model: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(
            *[_one(http, url, model, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens) for i in range(clients)]
        )
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


def _servers(path: Path, peers: bool) -> list[tuple[str, list[str], str, str]]:
    """(label, command, base URL, model name) for us and for each peer that is installed."""
    port = free_port()
    ours = [
        sys.executable,
        "-m",
        "appliance.cli",
        "serve",
        "--model",
        str(path),
        "--no-auth",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--max-batch",
        "16",
    ]
    servers = [("appliance (numpy, continuous batching)", ours, f"http://127.0.0.1:{port}", path.stem)]
    if not peers:
        return servers
    try:
        import llama_cpp.server  # noqa: F401

        peer_port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(peer_port),
            "--n_threads",
            str(os.cpu_count()),
            "--n_ctx",
            "4096",
            # by default a new request cuts off the one streaming; queue them instead, as a user would want
            "--interrupt_requests",
            "False",
        ]
        servers.append(("llama.cpp server (llama-cpp-python)", cmd, f"http://127.0.0.1:{peer_port}", path.name))
    except ImportError as e:
        Console(stderr=True).print(f"peer not measured: {e} (make bench-serve installs llama-cpp-python[server])")
    return servers


def run_bench_serve(path: Path, levels: list[int], max_tokens: int, peers: bool = True) -> list[dict]:
    rows = []
    for label, cmd, url, model in _servers(path, peers):
        with ExitStack() as stack:
            try:
                stack.enter_context(running(cmd, f"{url}/v1/models"))
            except (RuntimeError, TimeoutError) as e:  # a peer that will not start: say so, keep our figures
                Console(stderr=True).print(f"{label} not measured: {e}")
                continue
            asyncio.run(_level(url, model, 1, 4))  # warm up
            for clients in levels:
                try:
                    rows.append({"system": label, **asyncio.run(_level(url, model, clients, max_tokens))})
                except httpx.HTTPError as e:  # a server that fails under load is a result too
                    Console(stderr=True).print(f"{label} at {clients} clients failed: {e!r}")
                    nan = float("nan")
                    rows.append(
                        {
                            "system": f"{label} (FAILED)",
                            "clients": clients,
                            "tps": nan,
                            "ttft50": nan,
                            "ttft99": nan,
                            "itl50": nan,
                            "itl99": nan,
                        }
                    )
    print_table(
        f"{path.name}: streaming completions of {max_tokens} tokens, {os.cpu_count()} CPU threads",
        ["system", "clients", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
        [
            [
                r["system"],
                str(r["clients"]),
                f"{r['tps']:.1f}",
                f"{r['ttft50'] * 1e3:.0f}",
                f"{r['ttft99'] * 1e3:.0f}",
                f"{r['itl50'] * 1e3:.1f}",
                f"{r['itl99'] * 1e3:.1f}",
            ]
            for r in rows
        ],
    )
    return rows
