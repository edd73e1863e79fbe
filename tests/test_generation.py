"""Streamed generation on the real model: stops, limits, seeds, and streaming that adds up."""

from __future__ import annotations

import pytest

from models.engine import Engine
from models.errors import ContextLengthError
from models.sampling import InvalidParameterError, SamplingParams
from tests.gguf_factory import write_tiny_llama

FRANCE = "The capital of France is"


def test_streamed_pieces_add_up_to_the_text(engine):
    gen = engine.generate(engine.prompt_ids(FRANCE), max_tokens=24)
    pieces = list(gen)
    assert len(pieces) > 3 and "".join(pieces) == gen.text
    assert "Paris" in gen.text
    assert gen.finish_reason == "length" and gen.completion_tokens == 24


def test_chat_answer_ends_at_the_stop_token(engine):
    gen = engine.generate(engine.prompt_ids("What is the capital of France?", chat=True), max_tokens=64)
    text = gen.run()
    assert "Paris" in text and gen.finish_reason == "stop"
    assert gen.completion_tokens < 64 and "<|im_end|>" not in text


def test_stop_string_cuts_and_is_not_emitted(engine):
    ids = engine.prompt_ids("Count: 1, 2, 3, 4,")
    full = engine.generate(ids, max_tokens=20).run()
    assert "7" in full
    gen = engine.generate(ids, max_tokens=20, stop=["7"])
    streamed = "".join(gen)
    assert streamed == gen.text == full[: full.index("7")]
    assert gen.finish_reason == "stop"


def test_stop_token_ids(engine):
    ids = engine.prompt_ids(FRANCE)
    first = engine.generate(ids, max_tokens=1)
    first.run()
    gen = engine.generate(ids, max_tokens=10, stop_token_ids=[first.token_ids[0]])
    assert gen.run() == "" and gen.finish_reason == "stop" and gen.completion_tokens == 0


def test_same_seed_same_text_and_sampling_varies(engine):
    ids = engine.prompt_ids("Once upon a time")
    sample = lambda seed: engine.generate(ids, SamplingParams(temperature=1.0, top_p=0.95, seed=seed), 16).run()  # noqa: E731
    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_ignore_eos_runs_past_the_stop_token(engine):
    ids = engine.prompt_ids("What is the capital of France?", chat=True)
    stopped = engine.generate(ids, max_tokens=64)
    stopped.run()
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 64
    longer = engine.generate(ids, max_tokens=64, ignore_eos=True)
    longer.run()
    assert longer.finish_reason == "length" and longer.completion_tokens == 64
    assert longer.token_ids[: stopped.completion_tokens] == stopped.token_ids


def test_max_tokens_must_be_positive(engine):
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        engine.generate(engine.prompt_ids(FRANCE), max_tokens=-1)


def test_prompt_longer_than_context_is_refused(engine):
    ids = engine.prompt_ids("word " * 9000)
    with pytest.raises(ContextLengthError, match="context window is 8192 tokens"):
        engine.generate(ids)


def test_generation_stops_at_the_context_limit(tmp_path, engine):
    """On a model with a 256-token window, a 253-token prompt gets exactly 3 tokens, then 'length'."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", engine.model.file.metadata)
    tiny = Engine.load(path)
    assert tiny.model.config.context_length == 256
    ids = tiny.prompt_ids("hello world " * 200)[:253]
    gen = tiny.generate(ids, max_tokens=50, ignore_eos=True)  # random weights may pick a stop token
    gen.run()
    assert gen.completion_tokens == 3 and gen.finish_reason == "length"
    assert next(iter(gen.session.caches.values())).length == 255  # the last token is never fed back
    with pytest.raises(ContextLengthError):
        tiny.generate(tiny.prompt_ids("hello world " * 200)[:256])
