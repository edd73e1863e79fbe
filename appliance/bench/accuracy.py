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
from models.llama import Session

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
    """The same two arrays from llama.cpp on the same ids: logits of every position, and its output
    embeddings (the final norm's output, pooling off)."""
    import llama_cpp

    common = {"model_path": str(path), "n_ctx": 512, "n_batch": 512, "verbose": False}
    llm = llama_cpp.Llama(**common, logits_all=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    emb = llama_cpp.Llama(**common, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    hidden = np.array(emb.embed(emb.detokenize(ids).decode(errors="replace"), normalize=False), dtype=np.float32)
    return hidden, logits


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


def measure(path: Path, backend: str = "cpu", peer: bool = True) -> list[dict]:
    ref, ours = Engine.load(path, "numpy"), Engine.load(path, backend)
    rows = []
    for prompt in PROMPTS:
        ids = ref.tokenizer.encode(prompt)
        h_ref, l_ref = final_hidden_and_logits(ref, ids)
        h, lg = final_hidden_and_logits(ours, ids)
        equal, where = greedy_agreement(ours, ref, ids)
        row = {"prompt": prompt, "hidden": relative_error(h, h_ref), "logits": relative_error(lg, l_ref)}
        row |= {"greedy_equal": equal, "first_difference": where}
        if peer:
            try:
                h_cpp, l_cpp = llama_cpp_hidden_and_logits(path, ids)
            except ImportError:
                peer = False
            else:
                if h_cpp.shape == h_ref.shape:  # its own tokenization of the detokenized text may differ
                    row["llama_cpp_hidden"] = relative_error(h_cpp, h_ref)
                row["llama_cpp_logits"] = relative_error(l_cpp, l_ref)
        rows.append(row)
    return rows
