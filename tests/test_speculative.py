"""Speculative decoding: drafts checked in one pass, all local and across a chain of real workers.

Greedy text with drafts must be the text without them, token for token, including when a worker is
killed mid-generation (the replay after failover holds only the positions kept after rollbacks).
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import numpy as np
import pytest

from appliance.serving.scheduler import Scheduler
from appliance.startup import load_engine
from models.draft_model import ModelDrafter
from models.engine import Engine
from models.llama import KVCache
from models.sampling import Sampler, SamplingParams
from models.speculative import DraftLength, PromptLookup, Speculation, choose, speculation_for
from models.store import ModelStoreError
from tests.gguf_factory import byte_vocab, write_tiny_llama
from tests.test_offload import PROMPTS, home, new_worker  # noqa: F401  (home: the module's CA fixture)

CODE = (
    "Repeat this code exactly:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"  # a chat turn
)
TEXTS = [*PROMPTS, CODE]
TOKENS = 24


def prompt_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.prompt_ids(prompt, chat=prompt == CODE)


def tokens(engine: Engine, prompt: str, sampling: SamplingParams | None = None, n: int = TOKENS):
    gen = engine.generate(prompt_ids(engine, prompt), sampling, max_tokens=n, ignore_eos=True)
    gen.run()
    return gen


# -- the parts --------------------------------------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.draft([5, 1, 2, 3, 9, 1, 2, 3, 4, 7, 1, 2, 3], 2) == [4, 7]  # the latest 3-gram match
    assert lookup.draft([5, 6, 8, 6], 3) == [8, 6]  # a 1-gram when no longer one matches
    assert lookup.draft([1, 2, 3], 4) == []
    assert lookup.draft([1, 1], 0) == []


def test_a_truncated_cache_overwrites_what_it_forgot():
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, max_len=16, capacity=4)
    cache.reserve(3)
    cache.store(0, np.ones((3, 1, 2), np.float32), np.ones((3, 1, 2), np.float32))
    cache.advance(3)
    cache.truncate(1)
    cache.reserve(1)
    keys, _ = cache.store(0, np.full((1, 1, 2), 7, np.float32), np.zeros((1, 1, 2), np.float32))
    assert keys[:, 0, 0].tolist() == [1, 7]
    with pytest.raises(ValueError, match="cannot keep 5 positions"):
        cache.truncate(5)


def test_the_speculative_sampling_rule_keeps_the_models_distribution():
    """Whatever the draft, the token drawn is distributed as the sampler's own: 40k draws, each
    frequency within 5 standard deviations of its probability."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    for draft in (0, 3):
        n = 20_000
        counts = Counter(choose(sampler, np.log(p).astype(np.float32), [], draft) for _ in range(n))
        for token, prob in enumerate(p):
            assert abs(counts[token] / n - prob) < 5 * np.sqrt(prob * (1 - prob) / n), (draft, token, counts)


def test_the_draft_length_follows_acceptance():
    spec = Speculation(PromptLookup(), k_max=6, row_cost=0.05)
    always, never = DraftLength(spec), DraftLength(spec)
    for _ in range(20):
        always.record(always.k, always.k)
        never.record(never.k, 0)
    assert always.k == 6 and never.k == 1
    assert DraftLength(Speculation(PromptLookup(), row_cost=2.0)).k == 1  # rows dearer than they save


def test_an_unknown_draft_is_a_clear_error():
    assert speculation_for("none") is None
    assert speculation_for("auto", offloading=False) is None and speculation_for("lookup", offloading=False)
    with pytest.raises(ValueError, match="--draft must be one of auto, lookup, none"):
        speculation_for("llama-7b")


# -- all local --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(served) -> Engine:
    return Engine(served.model)


@pytest.fixture(scope="module")
def drafting(served) -> Engine:
    return Engine(served.model, speculation=Speculation(PromptLookup()))


@pytest.mark.parametrize("prompt", TEXTS)
def test_greedy_text_with_drafts_is_the_text_without(plain, drafting, prompt):
    gen = tokens(drafting, prompt)
    assert gen.token_ids == tokens(plain, prompt).token_ids
    assert gen.drafting.steps > 0


def test_repetitive_text_takes_several_tokens_a_step(drafting):
    gen = tokens(drafting, CODE, n=32)
    assert gen.drafting.accepted >= 12 and gen.drafting.steps <= 16, (gen.drafting.accepted, gen.drafting.steps)


def test_sampled_text_with_drafts_is_the_same_for_the_same_seed(drafting):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    first, again = tokens(drafting, CODE, sampling), tokens(drafting, CODE, sampling)
    assert first.token_ids == again.token_ids and first.drafting.steps > 0
    assert tokens(drafting, CODE, SamplingParams(temperature=0.8, seed=99)).token_ids != first.token_ids


# -- a draft model (--draft FILE) -------------------------------------------------------------------------
def test_a_draft_model_s_drafts_are_checked_and_the_text_is_the_model_s(plain, served, model_path, smol_meta, tmp_path):
    """The served model as its own draft: nearly every draft is taken, several tokens a step. A random tiny model
    with the same vocabulary: few are; the greedy text is the served model's either way."""
    vocabulary = smol_meta["tokenizer.ggml.tokens"]
    itself = ModelDrafter.load(model_path, vocabulary, "cpu")
    gen = tokens(Engine(served.model, speculation=Speculation(itself)), PROMPTS[0])
    assert gen.token_ids == tokens(plain, PROMPTS[0]).token_ids
    assert gen.drafting.accepted >= 0.9 * gen.drafting.drafted and gen.drafting.steps < TOKENS // 2
    tiny = ModelDrafter.load(write_tiny_llama(tmp_path / "tiny.gguf", smol_meta), vocabulary, "cpu")
    for prompt in (PROMPTS[1], CODE):
        gen = tokens(Engine(served.model, speculation=Speculation(tiny)), prompt)
        assert gen.token_ids == tokens(plain, prompt).token_ids and gen.drafting.drafted > 0
        assert gen.drafting.accepted < 0.5 * gen.drafting.drafted
    assert len(tiny._sessions) == 2  # one kept KV per text it drafted for


def test_a_draft_model_must_share_the_vocabulary(model_path, tmp_path):
    other = write_tiny_llama(tmp_path / "bytes.gguf", byte_vocab())
    with pytest.raises(ValueError, match="its vocabulary .* is not the served model's"):
        load_engine(model_path, "cpu", draft=str(other))
    with pytest.raises(ModelStoreError, match="--draft takes auto, lookup, none or a draft model: no model file"):
        load_engine(model_path, "cpu", draft=str(tmp_path / "missing.gguf"))


def test_the_scheduler_batches_sessions_with_different_drafts(plain, drafting):
    """Four generations in one batch, each with its own draft lengths: each one's text is its text alone."""
    scheduler = Scheduler(drafting, max_batch=4)
    scheduler.start()
    try:
        jobs = [drafting.generate(prompt_ids(drafting, p), max_tokens=TOKENS, ignore_eos=True) for p in TEXTS]
        ended = threading.Semaphore(0)
        for job in jobs:
            scheduler.submit(job, lambda event: event.kind in ("done", "error") and ended.release())
        for _ in jobs:
            assert ended.acquire(timeout=120)
    finally:
        scheduler.stop()
    for job, prompt in zip(jobs, TEXTS, strict=True):
        assert job.finish_reason == "length"
        assert job.token_ids == tokens(plain, prompt).token_ids


# -- across a chain of workers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def c_workers(home, tmp_path_factory):  # noqa: F811
    with (
        new_worker(home, tmp_path_factory, "s1", budget="45MB", backend="cpu") as w1,  # 14 layers of ~3 MB
        new_worker(home, tmp_path_factory, "s2", budget="45MB", backend="cpu") as w2,
        new_worker(home, tmp_path_factory, "s3", budget="45MB", backend="cpu") as w3,
    ):
        yield [w1, w2, w3]


def test_greedy_text_over_two_workers_with_drafts_is_all_local_text(model_path, plain, c_workers):
    split = load_engine(model_path, "cpu", "40MB", [w.address for w in c_workers[:2]])
    assert split.speculation is not None and len(split.offload.make_plan().chain) == 2
    for prompt in TEXTS:
        gen = tokens(split, prompt)
        assert gen.token_ids == tokens(plain, prompt).token_ids, prompt
        messages = gen.session.remote.round_trips - 1  # less the prompt's
        if prompt == CODE:  # fewer round trips than tokens: one message carries a token and its drafts
            assert messages < TOKENS, (messages, gen.drafting.accepted)
    split.offload.close()


def test_a_worker_killed_after_a_rollback_changes_nothing(model_path, plain, c_workers):
    """Three workers, two in use; after a step whose drafts were partly refused (the workers rolled
    back), one of the chain is killed: the replay into the new chain holds only the kept positions."""
    expected = tokens(plain, CODE, n=40).token_ids
    workers = {w.address: w for w in c_workers}
    split = load_engine(model_path, "cpu", "40MB", list(workers), step_timeout=2.0)
    gen = split.generate(prompt_ids(split, CODE), max_tokens=40, ignore_eos=True)
    victim = None
    while not gen.done:
        refused = gen.drafting.drafted - gen.drafting.accepted
        gen.step()
        if victim is None and gen.drafting.drafted - gen.drafting.accepted > refused and not gen.done:
            chain = [s.device.address for s in split.offload.current_plan()[0].chain]
            victim = workers[random.choice(chain)]
            victim.kill()
    assert victim is not None, "no draft was refused: nothing rolled back"
    assert gen.token_ids == expected
    assert victim.address not in split.offload.workers
    split.offload.close()
