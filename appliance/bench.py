"""`appliance bench`: our engine and its peers, each in a fresh process, measured on the same file.

Each subject loads the model, runs one prefill of the same prompt ids, then greedy-decodes a fixed
number of tokens with its KV cache. Resident memory is read after load; a fresh process per subject
keeps one subject's memory out of another's figure.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from models.engine import Engine
from models.llama import Session

FILLER = (
    "The appliance runs large language models at home. When a model is larger than its memory, the "
    "layers that do not fit run on the laptops and desktops of the house, which pass hidden states "
    "along over the local network. "
)


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def measure_appliance(path: str, backend: str, ids: list[int], n_decode: int) -> dict:
    start = time.perf_counter()
    engine = Engine.load(path, backend)
    engine.model.layer_range(0, engine.model.config.n_layers)  # prepare every layer's weights
    load_s, rss = time.perf_counter() - start, _rss_mib()
    session = Session()
    start = time.perf_counter()
    token = int(np.argmax(engine.forward(ids, session)[-1]))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_decode):
        token = int(np.argmax(engine.forward([token], session)[-1]))
    decode_s = time.perf_counter() - start
    return {
        "system": f"appliance ({engine.model.backend.name})",
        "load_s": load_s,
        "rss_mib": rss,
        "prefill_tps": len(ids) / prefill_s,
        "decode_tps": n_decode / decode_s,
    }


def measure_transformers(path: str, ids: list[int], n_decode: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    p = Path(path)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    load_s, rss = time.perf_counter() - start, _rss_mib()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - start
        token, past = out.logits[0, -1].argmax().view(1, 1), out.past_key_values
        start = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            token, past = out.logits[0, -1].argmax().view(1, 1), out.past_key_values
        decode_s = time.perf_counter() - start
    return {
        "system": f"transformers {__import__('transformers').__version__} (torch CPU, fp32)",
        "load_s": load_s,
        "rss_mib": rss,
        "prefill_tps": len(ids) / prefill_s,
        "decode_tps": n_decode / decode_s,
    }


def _in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run_bench(path: Path, backend: str, n_prompt: int, n_decode: int, peers: bool) -> list[dict]:
    tokenizer = Engine.load(path, backend).tokenizer
    ids = tokenizer.encode(FILLER * (1 + n_prompt // 30))[:n_prompt]
    rows = [_in_fresh_process(measure_appliance, str(path), backend, ids, n_decode)]
    if peers:
        try:
            rows.append(_in_fresh_process(measure_transformers, str(path), ids, n_decode))
        except ImportError as e:
            Console(stderr=True).print(f"peer transformers not measured: {e} (pip install '.[test]')")
    table = Table(
        title=f"{path.name}: {len(ids)}-token prompt, {n_decode} decoded tokens, {os.cpu_count()} CPU threads"
    )
    for col in ("system", "load s", "RSS MiB", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(
            r["system"],
            f"{r['load_s']:.2f}",
            f"{r['rss_mib']:.0f}",
            f"{r['prefill_tps']:.1f}",
            f"{r['decode_tps']:.1f}",
        )
    Console().print(table)
    return rows
