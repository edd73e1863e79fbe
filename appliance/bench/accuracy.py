"""How far each fast path's numbers are from the NumPy reference (float32 over the dequantized file).

Both our C backend and llama.cpp round the same things the same way in kind (activations to 8 bits per
block before each quantized matmul), so the honest comparison is their distance from one exact
reference on the same file, prompts and token ids: the relative error of the last layer's hidden
state (after the final norm, where llama.cpp's embeddings are read) and of the logits, over every
position of each prompt. Greedy text is compared to the reference's step by step, and where it first
differs the reference's own top-2 margin is printed beside our logit error at that step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.engine import Engine
from models.llama import KVCache, Session

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY_STEPS = 32


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def final_hidden_and_logits(engine: Engine, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """[T, D] hidden states after the final norm and [T, vocab] logits for every position of ids."""
    model = engine.model
    hidden = engine.hidden_states(ids, Session())
    normed = model.backend.rmsnorm(hidden, model.output_norm, model.config.norm_eps)
    return np.asarray(normed), np.asarray(model.head(hidden))


def llama_cpp_hidden_and_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The same two arrays from llama.cpp on the same ids, in one pass: every position's logits and
    output embeddings (the final norm's output: pooling off)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        verbose=False,
    )
    llm.eval(ids)
    n = llm.n_embd()
    hidden = [
        np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(llm.ctx, i), shape=(n,)) for i in range(len(ids))
    ]
    return np.array(hidden, dtype=np.float32), np.array(llm.scores[: len(ids)], dtype=np.float32)


def float16_cache_effect(ref: Engine) -> float:
    """Relative change of the reference's logits (every position of the three prompts) when its KV
    cache alone is float16, as the C backend keeps it: that rounding's share of our error."""
    c = ref.model.config
    exact, rounded = [], []
    for prompt in PROMPTS:
        ids = ref.tokenizer.encode(prompt)
        session = Session()
        for a, b in ref.ranges:
            session.caches[(a, b)] = KVCache(b - a, c.n_kv_heads, c.head_dim, c.context_length, dtype=np.float16)
        exact.append(ref.model.head(ref.hidden_states(ids, Session())))
        rounded.append(ref.model.head(ref.hidden_states(ids, session)))
    return relative_error(np.concatenate(rounded), np.concatenate(exact))


def greedy_agreement(ours: Engine, ref: Engine, ids: list[int], steps: int = GREEDY_STEPS) -> tuple[int, str]:
    """Steps our greedy tokens equal the reference's (fed the reference's tokens), and at the first
    difference the reference's top-2 margin beside our largest logit error there."""
    s_ours, s_ref = Session(), Session()
    lo, lr = ours.next_logits(ids, s_ours), ref.next_logits(ids, s_ref)
    for step in range(steps):
        if int(lo.argmax()) != int(lr.argmax()):
            top2 = np.sort(lr)[-2:]
            return step, f"margin {top2[1] - top2[0]:.3f} vs error {np.abs(lo - lr).max():.3f}"
        token = int(lr.argmax())
        lo, lr = ours.next_logits([token], s_ours), ref.next_logits([token], s_ref)
    return steps, ""


def measure(ref: Engine, backend: str = "cpu", peer: bool = True) -> list[dict]:
    """One row per prompt, then one over all three prompts' positions together."""
    path = ref.model.file.path
    ours = Engine.load(path, backend)
    rows, arrays = [], {"ref": [], "ours": [], "llama_cpp": []}  # per prompt: (hidden, logits)
    for prompt in PROMPTS:
        ids = ref.tokenizer.encode(prompt)
        arrays["ref"].append(final_hidden_and_logits(ref, ids))
        arrays["ours"].append(final_hidden_and_logits(ours, ids))
        if peer:
            try:
                arrays["llama_cpp"].append(llama_cpp_hidden_and_logits(path, ids))
            except ImportError:
                peer = False
        equal, where = greedy_agreement(ours, ref, ids)
        rows.append({"prompt": repr(prompt), "greedy_equal": equal, "first_difference": where})
    rows.append({"prompt": "all three"})
    for i, row in enumerate(rows):
        pick = slice(None) if i == len(PROMPTS) else slice(i, i + 1)  # the last row: every prompt at once
        ref_h, ref_l = (np.concatenate(a) for a in zip(*arrays["ref"][pick], strict=True))
        for name in ("ours", "llama_cpp") if peer else ("ours",):
            h, lg = (np.concatenate(a) for a in zip(*arrays[name][pick], strict=True))
            prefix = "" if name == "ours" else "llama_cpp_"
            row[prefix + "hidden"], row[prefix + "logits"] = relative_error(h, ref_h), relative_error(lg, ref_l)
    return rows
