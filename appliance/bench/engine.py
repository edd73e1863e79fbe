"""`appliance bench`: our engine and its peers, each in a fresh process, measured on the same file.

Each subject loads the model, runs one prefill of the same prompt ids, then greedy-decodes a fixed
number of tokens with its KV cache. Resident memory is read after load; a fresh process per subject
keeps one subject's memory out of another's figure.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from kernels import native
from kernels.backend import describe, select_backend
from models.engine import Engine
from models.llama import Session

FILLER = (
    "The appliance runs large language models at home. When a model is larger than its memory, the "
    "layers that do not fit run on the laptops and desktops of the house, which pass hidden states "
    "along over the local network. "
)


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _timed_greedy(system: str, load, ids: list[int], n_decode: int) -> dict:
    """Time load(), one prefill of ids, then n_decode greedy steps.

    load() returns (prefill, step): prefill(ids) -> first token, step(token) -> next token, each
    keeping its own KV cache between calls.
    """
    start = time.perf_counter()
    prefill, step = load()
    load_s, rss = time.perf_counter() - start, _rss_mib()
    start = time.perf_counter()
    token = prefill(ids)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_decode):
        token = step(token)
    decode_s = time.perf_counter() - start
    return {
        "system": system,
        "load_s": load_s,
        "rss_mib": rss,
        "prefill_tps": len(ids) / prefill_s,
        "decode_tps": n_decode / decode_s,
    }


def measure_appliance(path: str, backend: str, ids: list[int], n_decode: int, threads: int | None = None) -> dict:
    def load():
        engine = Engine.load(path, backend, threads)
        engine.model.layer_range(0, engine.model.config.n_layers)  # prepare every layer's weights
        session = Session()
        greedy = lambda tokens: int(np.argmax(engine.next_logits(tokens, session)))  # noqa: E731
        return greedy, lambda token: greedy([token])

    name = describe(select_backend(backend, threads))
    return _timed_greedy(f"appliance ({name} backend)", load, ids, n_decode)


def llama_bench(binary: Path, path: Path, n_prompt: int, n_decode: int, threads: int) -> dict:
    """llama.cpp's own llama-bench (pp n_prompt, tg n_decode) on the same file, 2 repetitions."""
    cmd = [str(binary), "-m", str(path), "-p", str(n_prompt), "-n", str(n_decode), "-t", str(threads)]
    out = subprocess.run([*cmd, "-r", "2", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return {"system": f"llama-bench ({threads} threads)", "prefill_tps": rates["pp"], "decode_tps": rates["tg"]}


def measure_transformers(path: str, ids: list[int], n_decode: int) -> dict:
    os.environ["TQDM_DISABLE"] = "1"  # its GGUF conversion bar would cut into the table
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the cache keyword's rename across versions
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_grad_enabled(False)

    def load():
        p = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        state = {"past": None}

        def run(tokens: list[int]) -> int:
            out = model(input_ids=torch.tensor([tokens]), past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

        return run, lambda token: run([token])

    return _timed_greedy(f"transformers {transformers.__version__} (torch CPU, fp32)", load, ids, n_decode)


def measure_llama_cpp(path: str, ids: list[int], n_decode: int) -> dict:
    import llama_cpp

    def load():
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=len(ids) + n_decode + 8, n_batch=len(ids), n_threads=os.cpu_count(), verbose=False
        )

        def run(tokens: list[int]) -> int:
            llm.eval(tokens)  # keeps only the last position's logits, read through the C API
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
            return int(np.argmax(logits))

        return run, lambda token: run([token])

    return _timed_greedy(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, CPU)", load, ids, n_decode)


# Peers: (measure function, how to get it installed).
PEERS = [
    (measure_llama_cpp, "make bench installs it (llama-cpp-python, built from source)"),
    (measure_transformers, "pip install '.[test]'"),
]


def _in_fresh_process(fn, *args) -> dict:
    """Run one subject in a new interpreter; a subject that crashes raises BrokenProcessPool, not a hang."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _ratio(row: dict, rows: list[dict]) -> str:
    """Decode speed over llama-bench's at the same thread count ("all cores" for the default rows)."""
    threads = 1 if "(1 threads)" in row["system"] or "1 threads" in row["system"] else os.cpu_count()
    peer = [r for r in rows if r["system"] == f"llama-bench ({threads} threads)"]
    return f"{row['decode_tps'] / peer[0]['decode_tps']:.2f}x" if peer else "-"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A benchmark's table: the first column names the system, the figures align right."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=130).print(table)


LLAMA_BENCH = Path(".venv/llama-rpc/llama-bench")  # make bench builds it from the llama-cpp-python sdist


def run_bench(
    path: Path, backend: str, n_prompt: int, n_decode: int, peers: bool, threads: int | None = None
) -> list[dict]:
    tokenizer = Engine.load(path, "numpy").tokenizer
    ids = tokenizer.encode(FILLER * (1 + n_prompt // 30))[:n_prompt]
    rows = [_in_fresh_process(measure_appliance, str(path), backend, ids, n_decode, threads)]
    cores = os.cpu_count() or 1
    if native.available() and peers:  # the C backend at 1 thread and all cores, the NumPy reference beside it
        rows += [_in_fresh_process(measure_appliance, str(path), "cpu", ids, n_decode, t) for t in sorted({1, cores})]
        if backend not in ("numpy", "auto"):  # auto is NumPy here (no GPU): its row is the first
            rows.append(_in_fresh_process(measure_appliance, str(path), "numpy", ids, n_decode))
    if peers and LLAMA_BENCH.exists():
        rows += [llama_bench(LLAMA_BENCH, path, len(ids), n_decode, t) for t in sorted({1, cores})]
    elif peers:
        Console(stderr=True).print(f"peer not measured: {LLAMA_BENCH} is not built (make bench builds it)")
    for measure, install in PEERS if peers else []:
        try:
            rows.append(_in_fresh_process(measure, str(path), ids, n_decode))
        except ImportError as e:
            Console(stderr=True).print(f"peer not measured: {e} ({install})")
        except BrokenProcessPool:
            Console(stderr=True).print(f"peer not measured: {measure.__name__} crashed (a build for another CPU?)")
    print_table(
        f"{path.name}: {len(ids)}-token prompt, {n_decode} decoded tokens, {os.cpu_count()} CPU threads",
        ["system", "load s", "RSS MiB", "prefill tok/s", "decode tok/s", "decode vs llama-bench"],
        [
            [
                r["system"],
                f"{r['load_s']:.2f}" if "load_s" in r else "-",
                f"{r['rss_mib']:.0f}" if "rss_mib" in r else "-",
                f"{r['prefill_tps']:.1f}",
                f"{r['decode_tps']:.1f}",
                _ratio(r, rows),
            ]
            for r in rows
        ],
    )
    return rows
