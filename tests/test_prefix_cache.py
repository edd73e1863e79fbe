"""The prefix cache: a later prompt that starts as an earlier one did reuses its KV, and the greedy text is the same
as without the cache; the cache stays within its bytes, the least recently used evicted first."""

from __future__ import annotations

import pytest

from models.engine import Engine
from models.llama import Session
from models.prefix_cache import PrefixCache
from models.sampling import SamplingParams

SYSTEM = "You are the assistant of a home. You answer briefly and plainly, in one sentence. " * 6
TURN = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def cached(model_path) -> Engine:
    engine = Engine.load(model_path, "auto")
    engine.enable_prefix_cache(64 << 20)
    return engine


def _two_turns(engine: Engine) -> tuple[list[str], list[int]]:
    first = engine.generate(engine.chat_ids(TURN), SamplingParams(), 16)
    first.run()
    follow = [*TURN, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = engine.generate(engine.chat_ids(follow), SamplingParams(), 16)
    second.run()
    return [first.text, second.text], [first.cached_tokens, second.cached_tokens]


def test_greedy_text_is_the_same_with_the_cache(cached, served):
    assert served.prefix_cache is None
    plain, _ = _two_turns(served)
    texts, reused = _two_turns(cached)
    assert texts == plain
    assert reused[1] > len(cached.chat_ids(TURN)) - 4  # turn 2 took turn 1's prompt (and answer) from the cache
    again, reused = _two_turns(cached)  # another client with the same system prompt and question
    assert again == plain and reused[0] == len(cached.chat_ids(TURN)) - 1
    stats = cached.prefix_cache.stats()
    assert stats["hits"] >= 3 and stats["tokens_reused"] > 3 * len(cached.chat_ids(TURN)) - 12
    assert 0 < stats["bytes"] <= stats["max_bytes"]


def test_the_cache_is_bounded_and_evicts_the_least_recent(cached):
    model = cached.model
    one = _session_bytes(cached, 40)
    cache = PrefixCache(int(2.5 * one), lambda layers: model.layer_range(*layers).new_cache())
    prompts = [[i + 10] * 40 for i in range(3)]
    for ids in prompts[:2]:
        cache.store(ids, _run(cached, ids))
    assert cache.restore(prompts[0] + [5], Session()) == 40  # prompt 0 is now the most recent
    cache.store(prompts[2], _run(cached, prompts[2]))  # over the bound: prompt 1 goes
    assert cache.evictions == 1 and cache.nbytes <= cache.max_bytes
    assert cache.restore(prompts[1] + [5], Session()) == 0
    assert cache.restore(prompts[0] + [5], Session()) == 40
    longer = prompts[2] + [7] * 20
    cache.store(longer, _run(cached, longer))  # extends prompt 2's entry, which it replaces
    assert cache.entries == 2
    session = Session()
    assert cache.restore(prompts[2] + [7] * 5 + [9], session) == 45
    assert {c.length for c in session.caches.values()} == {45}


def _run(engine: Engine, ids: list[int]) -> Session:
    session = Session()
    engine.forward(ids, session)
    return session


def _session_bytes(engine: Engine, n: int) -> int:
    return sum(c.k[:, :n].nbytes + c.v[:, :n].nbytes for c in _run(engine, [10] * n).caches.values())
