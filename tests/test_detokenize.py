"""Incremental detokenization: after every id, the text is the whole decode's complete part, at a
bounded cost per id."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.detokenize import REPLACEMENT, IncrementalDecoder
from tests.scale import full_or

TEXTS = [
    "Hello, world! 12345",
    "Ünïcödé façade — naïve café",
    "日本語のテキストと中文",
    "emoji 🙂🚀 and 👩‍👩‍👧",
    "  x\n\n\ty  ",
]


class Counting:
    """The tokenizer, remembering how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.windows = tokenizer, []

    def decode(self, ids: list[int]) -> str:
        self.windows.append(len(ids))
        return self.tokenizer.decode(ids)


def check_stream(tokenizer, ids: list[int]) -> IncrementalDecoder:
    decoder, streamed = IncrementalDecoder(tokenizer.decode), ""
    for k, token in enumerate(ids, 1):
        streamed += decoder.add(token)
        whole = tokenizer.decode(ids[:k])
        assert streamed == decoder.text and whole.startswith(decoder.text)
        assert not decoder.pending or whole[len(decoder.text) :].endswith(REPLACEMENT) or decoder.text == whole
    assert decoder.final() == tokenizer.decode(ids)
    return decoder


@pytest.mark.parametrize("text", TEXTS)
def test_text_grows_as_the_whole_decode_does(engine, text):
    check_stream(engine.tokenizer, engine.tokenizer.encode(text * 3))


@settings(max_examples=full_or(200, 40), deadline=None)
@given(st.lists(st.integers(0, 49151), min_size=1, max_size=40))
def test_any_ids_stream_to_the_whole_text(engine, ids):
    """Random ids: byte tokens that split characters, special tokens, anything a sampler may pick."""
    check_stream(engine.tokenizer, ids)


def test_each_id_costs_a_short_window(engine):
    """A 2000-token text decodes in windows of a few ids, not the whole history each time."""
    ids = engine.tokenizer.encode(" ".join(TEXTS) * 60)[:2000]
    counting = Counting(engine.tokenizer)
    decoder = IncrementalDecoder(counting.decode)
    for token in ids:
        decoder.add(token)
    assert decoder.final() == engine.tokenizer.decode(ids)
    assert max(counting.windows[:-1]) <= 16 and sum(counting.windows) < 10 * len(ids)
