"""`appliance bench-serve`'s chat figures: a two-turn chat with a long system prompt (turn 2's time to first token
against turn 1's, with the prefix cache and without it: `--prefix-cache-mb 0`; beside llama.cpp's llama-server with
its slot's prompt cache and `--cache-reuse`, and with `cache_prompt` off), and the decode tokens/s of JSON
constrained by a schema against free text of the same length, on the same server.

Each server is a fresh process on loopback; turns stream over /v1/chat/completions, greedy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx

from appliance.bench.engine import print_table
from appliance.testbed.launch import free_port, running

SYSTEM = "You are the assistant of a home: its devices, its people, its plans. You answer briefly and plainly. "
# a schema whose output is long and fixed in length: 64 small integers (the grammar ends it)
OFF = ("--prefix-cache-mb", "0")
LIST_SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 10, "maximum": 99},
    "minItems": 64,
    "maxItems": 64,
}


def _stream(url: str, model: str, body: dict) -> dict:
    """One streamed chat: time to first content, the decode time after it, the text and the token count."""
    body = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "decode_tps": (tokens - 1) / max(end - (first or end), 1e-9), "text": text}


def _server(path: Path, *args: str) -> tuple[list[str], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--model", str(path), "--no-auth", "--no-advertise"]
    cmd += ["--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port()), *args]
    return cmd, f"http://127.0.0.1:{port}"


def _llama_server(path: Path, binary: Path, *args: str) -> tuple[list[str], str]:
    """llama.cpp's server, one slot (a chat's turns share it), on every core."""
    port = free_port()
    cmd = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(os.cpu_count())]
    return [*cmd, "-np", "1", "-c", "8192", "--no-webui", *args], f"http://127.0.0.1:{port}"


def two_turns(url: str, model: str, system_words: int, extra: dict | None = None) -> tuple[float, float]:
    """Turn 1's and turn 2's TTFT (s) of a chat whose system prompt is about system_words words long; extra: more
    fields for each request (llama-server's cache_prompt)."""
    system = (SYSTEM * (system_words // len(SYSTEM.split()) + 1)).strip()
    turn = [{"role": "system", "content": system}, {"role": "user", "content": "Name the capital of France."}]
    first = _stream(url, model, {"messages": turn, "max_tokens": 16, **(extra or {})})
    follow = [*turn, {"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And of Italy?"}]
    return first["ttft"], _stream(url, model, {"messages": follow, "max_tokens": 16, **(extra or {})})["ttft"]


def constrained_vs_free(url: str, model: str, repeats: int = 5) -> tuple[float, float]:
    """Decode tokens/s (best of repeats, the two kinds interleaved so that a busy machine slows both alike) of
    64 schema-constrained integers, and of free text as long."""
    ask = [{"role": "user", "content": "List sixty-four two-digit numbers."}]
    schema = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": LIST_SCHEMA}}
    tokens = 64 * 2 + 1  # about what the list takes ("12, " is two tokens)
    constrained, free = 0.0, 0.0
    for _ in range(repeats):
        body = {"messages": ask, "response_format": schema, "max_tokens": 400}
        constrained = max(constrained, _stream(url, model, body)["decode_tps"])
        free = max(free, _stream(url, model, {"messages": ask, "max_tokens": tokens, "ignore_eos": True})["decode_tps"])
    return constrained, free


def mask_cost(path: Path) -> tuple[float, float]:
    """In this process: the grammar's share of a constrained decode step (mask and accept, us per token) and
    the decode step itself (us per token), on the same generation."""
    from models.engine import Engine

    engine = Engine.load(path)
    ids = engine.chat_ids([{"role": "user", "content": "List sixty-four two-digit numbers."}])
    constraint = engine.grammars.constraint(engine.grammars.json_schema(LIST_SCHEMA))
    spent = [0.0]

    def timed(f):
        def run(*args):
            start = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - start

        return run

    constraint.mask, constraint.accept = timed(constraint.mask), timed(constraint.accept)
    gen = engine.generate(ids, max_tokens=400, constraint=constraint)
    start, first = time.perf_counter(), None
    for _ in gen:
        first = first or time.perf_counter()
    n = gen.completion_tokens
    return spent[0] / n * 1e6, (time.perf_counter() - (first or start)) / max(n - 1, 1) * 1e6


def run_chat_bench(path: Path, system_words: int = 1500, llama_bin: Path | None = None) -> dict:
    """llama_bin: where llama-server is (make bench-serve builds it); its rows are left out where it is not."""
    servers = [("ours, prefix cache on", _server(path), {}), ("ours, --prefix-cache-mb 0", _server(path, *OFF), {})]
    binary = (llama_bin or Path(sys.prefix) / "llama-rpc") / "llama-server"
    if binary.exists():
        servers += [
            ("llama-server, slot cache + --cache-reuse 256", _llama_server(path, binary, "--cache-reuse", "256"), {}),
            ("llama-server, cache_prompt false", _llama_server(path, binary), {"cache_prompt": False}),
        ]
    else:
        print(f"llama-server not measured: no {binary} (make bench-serve builds it)", file=sys.stderr)
    figures: dict = {}
    for label, (cmd, url), extra in servers:
        health = f"{url}/health"
        with running(cmd, health):
            _stream(url, path.stem, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # warm up
            figures[label] = two_turns(url, path.stem, system_words, extra)
            if label == "ours, prefix cache on":
                figures["grammar"] = constrained_vs_free(url, path.stem)
    print_table(
        f"{path.name}: a two-turn chat, a system prompt of ~{system_words} words (one server at a time)",
        ["server", "turn 1 TTFT ms", "turn 2 TTFT ms", "turn 2 / turn 1", "target"],
        [[label, f"{t1 * 1e3:.0f}", f"{t2 * 1e3:.0f}", f"{t2 / t1:.2f}", "<= 0.25" if label.endswith("on") else "-"]
         for label, (t1, t2) in ((label, figures[label]) for label, _, _ in servers)],
    )  # fmt: skip
    constrained, free = figures["grammar"]
    figures["mask_us"], figures["step_us"] = mask_us, step_us = mask_cost(path)
    print_table(
        "decode tokens/s, JSON schema (64 integers) against free text of the same length",
        ["constrained", "free", "constrained / free", "target", "grammar us/token", "decode step us/token"],
        [[f"{constrained:.1f}", f"{free:.1f}", f"{constrained / free:.2f}", ">= 0.90", f"{mask_us:.0f}",
          f"{step_us:.0f}"]],
    )  # fmt: skip
    return figures
