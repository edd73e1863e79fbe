"""The KV cache grows by doubling and the weights are prepared once: decode does no per-token bulk work."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ContextLengthError
from models.llama import KVCache, Session


def test_capacity_doubles_so_copies_are_rare():
    cache = KVCache(n_layers=2, n_kv_heads=3, head_dim=4, max_len=1000, capacity=8)
    grown, buffer = 0, cache.k  # held, so a new array is never mistaken for it (freed ids are reused)
    for step in range(300):
        cache.reserve(1)
        if cache.k is not buffer:
            grown, buffer = grown + 1, cache.k
        kv = np.full((1, 3, 4), step, dtype=np.float32)
        keys, values = cache.store(0, kv, kv)
        cache.store(1, kv, kv)
        cache.advance(1)
        assert keys.shape == (step + 1, 3, 4)
    assert cache.capacity == 512 and grown == 6  # 8 -> 16 -> ... -> 512: six copies for 300 tokens
    np.testing.assert_array_equal(cache.k[1, :300, 0, 0], np.arange(300))  # nothing lost in the moves


def test_capacity_never_exceeds_the_context():
    cache = KVCache(1, 1, 2, max_len=10, capacity=8)
    cache.reserve(10)
    assert cache.capacity == 10
    cache.advance(10)
    with pytest.raises(ContextLengthError, match="context window of 10 tokens"):
        cache.reserve(1)


def test_decoding_reuses_prepared_weights(engine):
    n = engine.model.config.n_layers
    layers = engine.model.layer_range(0, n)
    before = [L.wq for L in layers.layers]
    session = Session()
    engine.forward(engine.tokenizer.encode("Hello"), session)
    for _ in range(3):
        engine.forward([42], session)
    assert engine.model.layer_range(0, n) is layers
    assert all(L.wq is w for L, w in zip(engine.model.layer_range(0, n).layers, before, strict=True))
    assert engine.model.layer_range(0, 10).layers[0] is layers.layers[0]  # ranges share layer weights


def test_bad_ranges_and_hidden_states_are_refused(engine):
    config = engine.model.config
    with pytest.raises(ValueError, match="outside"):
        engine.model.layer_range(20, config.n_layers + 1)
    with pytest.raises(ValueError, match="hidden states must be"):
        engine.model.run_layers((0, 1), np.zeros((2, 7), np.float32), Session())
    with pytest.raises(ValueError, match="token ids"):
        engine.model.embed([config.vocab_size])
