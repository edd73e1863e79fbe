"""Continuous batching at the model level: sessions sharing a pass get exactly what they get alone."""

from __future__ import annotations

import numpy as np

from models.llama import Session
from models.sampling import SamplingParams


def test_a_batch_of_prefills_and_decodes_equals_each_alone(engine):
    tok = engine.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def add(a, b):"), tok.encode("Once upon")]
    alone = []
    for ids in prompts:
        s = Session()
        engine.forward(ids[:-1], s)
        alone.append(engine.next_logits(ids[-1:], s))
    # in a batch: sequence 0 decodes its last token, 1 prefills all but a chunk, 2 prefills whole
    sessions = [Session(), Session(), Session()]
    engine.forward(prompts[0][:-1], sessions[0])
    engine.forward(prompts[1][:2], sessions[1])
    batch = [prompts[0][-1:], prompts[1][2:], prompts[2]]
    together = engine.next_logits_batch(batch, sessions)
    assert together.shape == (3, engine.model.config.vocab_size)
    for got, want in zip(together, alone, strict=True):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_chunked_prefill_gives_the_same_text(engine):
    ids = engine.prompt_ids("Why is the sky blue? Explain like I am five.", chat=True)
    whole = engine.generate(ids, SamplingParams(), 20)
    whole.run()
    chunked = engine.generate(ids, SamplingParams(), 20)
    while not chunked.done:
        step = chunked.next_input(prefill_chunk=7)
        assert len(step) <= 7
        chunked.advance(len(step), engine.next_logits(step, chunked.session))
    assert chunked.text == whole.text and chunked.token_ids == whole.token_ids
