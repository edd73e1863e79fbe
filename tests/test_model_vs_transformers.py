"""Our NumPy Llama against Hugging Face transformers loading the same GGUF file on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.llama import Session

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "<|im_start|>user\nWhy is the sky blue? Explain in one sentence.<|im_end|>\n<|im_start|>assistant\n",
]


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    out_ids = []
    with torch.inference_mode():
        out = hf_model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            out_ids.append(token)
            out = hf_model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids


def our_greedy(engine, ids: list[int], n: int) -> list[int]:
    session, out_ids = Session(), []
    logits = engine.next_logits(ids, session)
    for _ in range(n):
        out_ids.append(int(np.argmax(logits)))
        logits = engine.next_logits([out_ids[-1]], session)
    return out_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_logits_match_transformers(engine, hf_model, prompt):
    ids = engine.tokenizer.encode(prompt)
    ours = engine.forward(ids, Session())
    with torch.inference_mode():
        theirs = hf_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_match_transformers(engine, hf_model, prompt):
    ids = engine.tokenizer.encode(prompt)
    assert our_greedy(engine, ids, 32) == hf_greedy(hf_model, ids, 32)


def test_prefill_then_decode_equals_one_pass(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    continuation = our_greedy(engine, ids, 16)
    full = engine.forward(ids + continuation, Session())
    session = Session()
    stepwise = [engine.forward(ids, session)]
    stepwise += [engine.forward([t], session) for t in continuation]
    stepwise = np.concatenate(stepwise)
    assert rel_err(stepwise, full) < 1e-5
    for row in range(len(ids), len(ids) + len(continuation)):  # and position by position
        assert rel_err(stepwise[row], full[row]) < 1e-5


def test_three_layer_ranges_equal_one(engine):
    model = engine.model
    ids = engine.tokenizer.encode(PROMPTS[1])
    n = model.config.n_layers
    thirds = [(0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)]
    one, three = Session(), Session()
    for step in [ids, [42], [7], [1234]]:
        h1 = model.run_layers((0, n), model.embed(step), one)
        h3 = model.embed(step)
        for layers in thirds:
            h3 = model.run_layers(layers, h3, three)
        np.testing.assert_allclose(h3, h1, rtol=0, atol=1e-6)
    assert set(three.caches) == set(thirds)
    assert [c.length for c in three.caches.values()] == [len(ids) + 3] * 3


def test_sessions_do_not_share_state(engine):
    """Interleaving two conversations gives each the logits it gets alone."""
    a_ids, b_ids = engine.tokenizer.encode(PROMPTS[0]), engine.tokenizer.encode(PROMPTS[2])
    alone = engine.forward(a_ids + [11], Session())[-1]
    a, b = Session(), Session()
    engine.forward(a_ids, a)
    engine.forward(b_ids, b)
    engine.forward([11], b)
    np.testing.assert_allclose(engine.next_logits([11], a), alone, rtol=0, atol=1e-4)
