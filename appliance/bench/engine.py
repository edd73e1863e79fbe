"""`appliance bench`: our backends and their peers, each in a fresh process, measured on the same file.

Every subject is measured the way llama-bench measures itself, so the figures compare: prefill is one
prompt of n tokens into an empty cache, timed to its first token (that time is the TTFT), and decode
is n tokens generated one at a time from an empty cache. Each subject runs in a fresh process at 1
thread and at all cores, so its peak resident memory is its own. The memory-bandwidth bound says how
fast decode could go if reading the weights once per token were all it did.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from appliance.bench import accuracy
from kernels.backend import describe
from models.engine import Engine
from models.llama import Session

FILLER = (
    "The appliance runs large language models at home. When a model is larger than its memory, the "
    "layers that do not fit run on the laptops and desktops of the house, which pass hidden states "
    "along over the local network. "
)
LLAMA_BENCH = Path(".venv/llama-rpc/llama-bench")  # make bench builds it from the llama-cpp-python sdist


def _peak_mib() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (getrusage's maximum
    would carry over the parent's, copied by the fork before the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB there too on most


def _timed_greedy(load, threads: int, ids: list[int], n_decode: int) -> dict:
    """Time load(), a prefill of ids (to its first token), and n_decode greedy steps from an empty cache.

    load() returns (system name, new_session); new_session() returns (prefill, step): prefill(ids) ->
    next token, step(token) -> next token, both extending that session's KV cache.
    """
    start = time.perf_counter()
    system, new_session = load()
    load_s = time.perf_counter() - start
    prefill, _ = new_session()
    start = time.perf_counter()
    prefill(ids)
    ttft = time.perf_counter() - start
    prefill, step = new_session()
    token = prefill(ids[:1])
    start = time.perf_counter()
    for _ in range(n_decode):
        token = step(token)
    decode_s = time.perf_counter() - start
    return {
        "system": system,
        "threads": threads,
        "load_s": load_s,
        "peak_mib": _peak_mib(),
        "ttft_ms": ttft * 1000,
        "prefill_tps": len(ids) / ttft,
        "decode_tps": n_decode / decode_s,
    }


def measure_appliance(path: str, backend: str, threads: int, ids: list[int], n_decode: int) -> dict:
    def load():
        engine = Engine.load(path, backend, threads)
        engine.model.layer_range(0, engine.model.config.n_layers)  # prepare every layer's weights

        def new_session():
            session = Session()
            greedy = lambda tokens: int(np.argmax(engine.next_logits(tokens, session)))  # noqa: E731
            return greedy, lambda token: greedy([token])

        return f"appliance, {describe(engine.model.backend)}", new_session

    return _timed_greedy(load, threads, ids, n_decode)


def measure_llama_cpp(path: str, threads: int, ids: list[int], n_decode: int) -> dict:
    import llama_cpp

    def load():
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=len(ids) + n_decode + 8,
            n_batch=len(ids),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

        def new_session():
            llm.reset()  # the next eval overwrites the cache from position 0

            def run(tokens: list[int]) -> int:
                llm.eval(tokens)  # keeps only the last position's logits, read through the C API
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
                return int(np.argmax(logits))

            return run, lambda token: run([token])

        return f"llama-cpp-python {llama_cpp.__version__}", new_session

    return _timed_greedy(load, threads, ids, n_decode)


def measure_transformers(path: str, threads: int, ids: list[int], n_decode: int) -> dict:
    os.environ["TQDM_DISABLE"] = "1"  # its GGUF conversion bar would cut into the table
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the cache keyword's rename across versions
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)

    def load():
        p = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)

        def new_session():
            state = {"past": None}

            def run(tokens: list[int]) -> int:
                out = model(input_ids=torch.tensor([tokens]), past_key_values=state["past"], use_cache=True)
                state["past"] = out.past_key_values
                return int(out.logits[0, -1].argmax())

            return run, lambda token: run([token])

        return f"transformers {transformers.__version__} (torch, fp32)", new_session

    return _timed_greedy(load, threads, ids, n_decode)


def llama_bench(binary: Path, path: Path, n_prompt: int, n_decode: int, threads: int) -> dict:
    """llama.cpp's own llama-bench (pp n_prompt, tg n_decode) on the same file, 2 repetitions."""
    cmd = [str(binary), "-m", str(path), "-p", str(n_prompt), "-n", str(n_decode), "-t", str(threads)]
    out = subprocess.run([*cmd, "-r", "2", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return {
        "system": "llama-bench",
        "threads": threads,
        "ttft_ms": n_prompt / rates["pp"] * 1000,
        "prefill_tps": rates["pp"],
        "decode_tps": rates["tg"],
    }


@contextmanager
def _blas_threads(n: int):
    """NumPy's BLAS reads its thread count once, at import: set it for the fresh process about to start."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(n) for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _in_fresh_process(fn, *args, threads: int) -> dict:
    """Run one subject in a new interpreter; a subject that crashes raises BrokenProcessPool, not a hang."""
    with _blas_threads(threads), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def read_bandwidth(threads: int, mib: int = 512) -> float:
    """Bytes per second that `threads` threads read from memory (summing their share of a large array)."""
    data = np.ones(mib * 2**20 // 8)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # NumPy's reductions release the GIL
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A benchmark's table: the first column names the system, the figures align right."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=150).print(table)


def _vs_llama_bench(row: dict, rows: list[dict], key: str) -> str:
    peer = [r for r in rows if r["system"] == "llama-bench" and r["threads"] == row["threads"]]
    return f"{row[key] / peer[0][key]:.2f}x" if peer else "-"


def _sizes(model, n_tokens: int) -> tuple[int, dict[str, int]]:
    """Bytes read per decoded token (every tensor once: the tied head reads the whole embedding table)
    and the KV cache of n_tokens as each system holds it (float16 but for the NumPy reference's float32)."""
    c = model.config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim
    kv = {"C and llama.cpp (float16)": per_token * 2 * n_tokens, "NumPy (float32)": per_token * 4 * n_tokens}
    return model.file.quantized_bytes, kv


def run_bench(
    path: Path, backends: list[str], threads: list[int], n_prompt: int, n_decode: int, peers: bool
) -> list[dict]:
    reference = Engine.load(path, "numpy")  # its tokenizer, config and file; the accuracy table's reference
    ids = reference.tokenizer.encode(FILLER * (1 + n_prompt // 30))[:n_prompt]
    err = Console(stderr=True)
    rows = []
    for t in threads:
        rows += [_in_fresh_process(measure_appliance, str(path), b, t, ids, n_decode, threads=t) for b in backends]
        if not peers:
            continue
        if LLAMA_BENCH.exists():
            rows.append(llama_bench(LLAMA_BENCH, path, len(ids), n_decode, t))
        else:
            err.print(f"peer not measured: {LLAMA_BENCH} is not built (make bench builds it)")
        try:
            rows.append(_in_fresh_process(measure_llama_cpp, str(path), t, ids, n_decode, threads=t))
        except ImportError as e:
            err.print(f"peer not measured: {e} (make bench builds llama-cpp-python from source)")
        except BrokenProcessPool:
            err.print("peer not measured: llama-cpp-python crashed (a build for another CPU?)")
    if peers:  # the independent reference, at all cores only: it takes half a minute to load
        try:
            rows.append(
                _in_fresh_process(measure_transformers, str(path), max(threads), ids, n_decode, threads=max(threads))
            )
        except ImportError as e:
            err.print(f"peer not measured: {e} (pip install '.[test]')")
    print_table(
        f"{path.name}: pp{len(ids)} (prefill, TTFT) and tg{n_decode} (decode from an empty cache), greedy",
        [
            "system",
            "threads",
            "load s",
            "peak RSS MiB",
            "TTFT ms",
            "prefill tok/s",
            "decode tok/s",
            "prefill vs llama-bench",
            "decode vs llama-bench",
        ],
        [
            [
                r["system"],
                str(r["threads"]),
                f"{r['load_s']:.2f}" if "load_s" in r else "-",
                f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-",
                f"{r['ttft_ms']:.0f}",
                f"{r['prefill_tps']:.1f}",
                f"{r['decode_tps']:.1f}",
                _vs_llama_bench(r, rows, "prefill_tps"),
                _vs_llama_bench(r, rows, "decode_tps"),
            ]
            for r in rows
        ],
    )
    weights, kv = _sizes(reference.model, len(ids) + n_decode)
    mib = 2**20
    print(
        f"file {path.stat().st_size / mib:.1f} MiB; weights read per decoded token {weights / mib:.1f} MiB; "
        f"KV cache at {len(ids) + n_decode} tokens: " + ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in kv.items())
    )
    for t in threads:
        bw = read_bandwidth(t)
        print(f"read bandwidth, {t} thread(s): {bw / 1e9:.1f} GB/s -> decode bound {bw / weights:.0f} tok/s")
    for backend in (b for b in backends if b != "numpy"):
        print_accuracy(reference, backend, peers)
    return rows


def print_accuracy(reference: Engine, backend: str, peers: bool) -> None:
    """Relative error against the NumPy reference, ours beside llama.cpp's (appliance/bench/accuracy.py)."""
    rows = accuracy.measure(reference, backend, peers)
    fmt = lambda r, k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
    print_table(
        "error against the NumPy reference (float32 on the dequantized file), every position of each prompt",
        [
            "prompt",
            f"hidden: {backend}",
            "hidden: llama.cpp",
            f"logits: {backend}",
            "logits: llama.cpp",
            f"greedy = reference for (of {accuracy.GREEDY_STEPS})",
            "where it first differs",
        ],
        [
            [
                r["prompt"],
                fmt(r, "hidden"),
                fmt(r, "llama_cpp_hidden"),
                fmt(r, "logits"),
                fmt(r, "llama_cpp_logits"),
                str(r.get("greedy_equal", "-")),
                r.get("first_difference") or "-",
            ]
            for r in rows
        ],
    )
    if backend == "cpu":
        change = accuracy.float16_cache_effect(reference)
        print(f"of which the float16 KV cache alone (the reference with its cache in float16): logits {change:.5f}")
