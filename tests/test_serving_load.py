"""Many clients at once, and generated requests against the served OpenAPI document."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import numpy as np
import openai
import psutil
import pytest
import schemathesis
import tritonclient.http as httpclient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from models.llama import Session
from models.sampling import SamplingParams
from tests.serving import running_server

KEY = "load-key"
PROMPTS = [
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time",
    "Water boils at",
    "The best way to learn",
    "My cat likes",
    "import numpy as np",
    "Three primary colours:",
]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_32_concurrent_streams(served, model_path):
    """32 streaming clients (8 prompts x 4) through a 16-wide batch and a queue, within a time bound:
    every request completes, each with exactly its prompt's text; memory returns to its idle level."""
    expected = {p: served.generate(served.prompt_ids(p), SamplingParams(), 24).run() for p in PROMPTS}
    with running_server("--max-batch", "16", "--max-queue", "32", key=KEY) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)

        def stream(prompt: str) -> str:
            chunks = client.completions.create(
                model=served.name, prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in chunks if c.choices)

        stream(PROMPTS[0])  # warm: weights prepared, first allocations made
        idle = rss_mib(server.pid)
        jobs = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            texts = list(pool.map(stream, jobs, timeout=600))  # the time bound: TimeoutError past it
        assert texts == [expected[p] for p in jobs]
        health = httpx.get(f"{server.url}/health").json()
        assert health["active"] == 0 and health["waiting"] == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "appliance_kv_cache_bytes 0.0" in metrics
        assert rss_mib(server.pid) < idle + 64  # the caches of 32 sessions are gone (allocator slack allowed)


@pytest.fixture(scope="module")
def server(model_path):
    with running_server("--max-tokens-limit", "4", key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_document_fuzzed(case):
    """Whatever schemathesis sends (valid or not), the answer is never a 5xx."""
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error])


@pytest.fixture(scope="module")
def negative_schema(server):
    """The same document, with data that does not fit it (schemathesis' negative mode)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.NEGATIVE])
    return schema


# Only /v1's POSTs have a body schema to break: /v2 reads its bodies itself (tests/test_fuzz.py sends those any
# JSON), and with nothing to break schemathesis 4.32 fails instead of skipping.
negative = schemathesis.pytest.from_fixture("negative_schema").include(method="POST", path_regex="^/v1/")


@negative.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_document_fuzzed_with_invalid_data(case):
    """Requests that break the document's rules are refused with a 4xx, never a 5xx."""
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error])


COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"  # greedy text that goes on for hundreds of tokens


@pytest.mark.parametrize("via", ["scoring", "embedding"])
def test_a_long_scoring_request_does_not_stall_a_stream(served, via):
    """A 2000-token prompt scored through KServe `NAME-logits` (or embedded through /v1/embeddings)
    while a client streams: the scheduler prefills it in chunks between the stream's tokens (scoring
    run in one pass on the event loop froze every stream for its whole 5-8 s), so tokens keep arriving
    while it runs, no gap comes near its own time, and both answers are the ones each gets alone."""
    long_ids = (served.tokenizer.encode("The appliance serves every device of the home. ") * 200)[:2000]
    if via == "scoring":
        want = served.next_logits(long_ids, Session())
    else:
        pooled = served.model.final_norm(served.hidden_states(long_ids, Session())).mean(axis=0)
        want = pooled / np.linalg.norm(pooled)
    expected = served.generate(served.prompt_ids(COUNTING), SamplingParams(), 300).run()
    with running_server(key=KEY) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)
        scorer = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=300)
        arrivals: list[float] = []
        pieces: list[str] = []
        first_tokens = threading.Event()

        def stream() -> None:
            chunks = client.completions.create(
                model=served.name, prompt=COUNTING, max_tokens=300, temperature=0, stream=True
            )
            for c in chunks:
                if c.choices and c.choices[0].text:
                    pieces.append(c.choices[0].text)
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 4:
                        first_tokens.set()

        def score() -> tuple[float, float, np.ndarray]:
            first_tokens.wait(120)
            t = httpclient.InferInput("input_ids", [len(long_ids)], "INT64")
            t.set_data_from_numpy(np.array(long_ids, dtype=np.int64))
            began = time.monotonic()
            if via == "embedding":
                vector = client.embeddings.create(model=served.name, input=[long_ids]).data[0].embedding
                return began, time.monotonic(), np.array(vector)
            r = scorer.infer(f"{served.name}-logits", [t], headers={"authorization": f"Bearer {KEY}"})
            return began, time.monotonic(), r.as_numpy("logits")

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streaming, scoring = pool.submit(stream), pool.submit(score)
            began, ended, logits = scoring.result(timeout=300)
            streaming.result(timeout=300)
    assert "".join(pieces) == expected
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-3 * np.abs(want).max())
    during = [a for a in arrivals if began < a < ended]
    gaps = np.diff([a for a in arrivals if began - 1 < a < ended + 1])
    assert len(during) >= 10, f"{len(during)} tokens arrived during the {ended - began:.1f} s {via}"
    assert gaps.max() < max(1.0, (ended - began) / 5), f"longest gap {gaps.max():.2f} s"
