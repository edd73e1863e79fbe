"""The OpenAI-compatible REST API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from kernels.backend import describe
from kernels.cuda_backend import gpu_present
from models.sampling import SamplingParams
from tests.serving import running_server

KEY = "test-key"
QUESTION = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def url(model_path):
    with running_server("--max-batch", "8", "--max-queue", "64", key=KEY) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client, served, model_path):
    assert [m.id for m in client.models.list()] == [served.name] == ["smollm2-135m-instruct"]  # the store's name
    for alias in (model_path.stem, model_path.name, "SmolLM2-135M-Instruct"):  # other spellings are taken
        r = client.completions.create(model=alias, prompt="Hi", max_tokens=1)
        assert r.model == served.name


def test_chat_equals_the_engine(client, served):
    r = client.chat.completions.create(model=served.name, messages=QUESTION, temperature=0, max_tokens=40)
    expected = served.generate(served.chat_ids(QUESTION), SamplingParams(), 40)
    assert r.choices[0].message.content == expected.run()
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == expected.finish_reason == "stop"
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens


def test_chat_streaming_equals_plain(client, served):
    plain = client.chat.completions.create(model=served.name, messages=QUESTION, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model=served.name,
            messages=QUESTION,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 5
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_completions_with_stop_and_length(client, served):
    r = client.completions.create(model=served.name, prompt="The capital of France is", max_tokens=12, temperature=0)
    expected = served.generate(served.prompt_ids("The capital of France is"), SamplingParams(), 12).run()
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    cut = client.completions.create(
        model=served.name, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["."]
    )
    assert cut.choices[0].text == expected[: expected.index(".")] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=served.name, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seed_repeats_and_n_choices_differ(client, served):
    ask = dict(model=served.name, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=11)
    a, b = client.completions.create(**ask), client.completions.create(**ask)
    assert a.choices[0].text == b.choices[0].text
    many = client.completions.create(**ask, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a.choices[0].text
    assert len({c.text for c in many.choices}) > 1


def test_concurrent_streams_are_not_mixed(client, served, url):
    """Eight clients at once, each a different prompt: each gets exactly its own greedy text."""
    prompts = [f"Write the number {i} in words:" for i in range(8)]
    expected = {p: served.generate(served.prompt_ids(p), SamplingParams(), 16).run() for p in prompts}

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=served.name, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(zip(prompts, pool.map(stream, prompts), strict=True))
    assert got == expected
    assert httpx.get(f"{url}/health").json()["active"] == 0


def test_a_client_that_leaves_is_cancelled(url, served):
    body = {"model": served.name, "prompt": "Tell me a very long story.", "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{url}/health").json()["active"] == 0


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ({"model": "{name}", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "{name}", "prompt": "hi", "max_tokens": 100000}, 400, "at most 4096"),
        ({"model": "{name}", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": "{name}", "prompt": 42}, 400, "prompt"),
        ({"model": "{name}"}, 400, "prompt"),
        ({"model": "{name}", "prompt": "hi", "stop": ["", "x"]}, 400, "stop"),
        ({"model": "{name}", "prompt": "word " * 9000}, 400, "context window"),
        ({"model": "{name}", "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests(url, served, body, status, fragment):
    body = {k: (v.format(name=served.name) if isinstance(v, str) and k == "model" else v) for k, v in body.items()}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "content,status",
    [(b"{not json", 400), (b'{"model": "x", "prompt": "\xff\xfe"}', 400), (b"x" * (2 << 20), 413)],
)
def test_malformed_bodies(url, content, status):
    r = httpx.post(
        f"{url}/v1/completions",
        content=content,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status and "error" in r.json()


def test_keys(url, served):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key


def test_still_serving_after_all_that(client, served):
    r = client.completions.create(model=served.name, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text


def test_full_queue_is_a_429_with_a_retry_hint(served):
    """One slot in the batch, one in the queue: a third concurrent request is turned away at once."""
    with running_server("--max-batch", "1", "--max-queue", "1", key=KEY) as server:
        u = server.url
        body = {
            "model": served.name,
            "prompt": "Tell me a long story.",
            "max_tokens": 300,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }  # the first two cannot end while the third asks
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=u, headers=headers, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as first:
                first_lines = first.iter_lines()  # held: a dropped line iterator makes httpx close the connection
                next(first_lines)  # running
                with http.stream("POST", "/v1/completions", json=body) as second:
                    assert second.status_code == 200  # queued
                    health = http.get("/health").json()
                    assert (health["active"], health["waiting"]) == (1, 1), health
                    third = http.post("/v1/completions", json=body)
                    assert third.status_code == 429
                    assert third.headers["Retry-After"] == "1" and "busy" in third.json()["error"]["message"]
                    assert next(line for line in first_lines if line).startswith("data: ")  # the first runs on
            # once the two have gone (the server notices at its next write), the queue has room again
            deadline = time.monotonic() + 15
            while (
                r := http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            ).status_code == 429:
                assert time.monotonic() < deadline, "the queue never drained"
                time.sleep(float(r.headers["Retry-After"]) / 4)
            assert r.status_code == 200


def test_metrics(url, client, served):
    client.completions.create(model=served.name, prompt="Hello", max_tokens=3, temperature=0)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401  # counted
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "appliance_requests_total",
        "appliance_time_to_first_token_seconds_bucket",
        "appliance_tokens_generated_total",
        "appliance_batch_size_bucket",
        "appliance_kv_cache_bytes",
        "appliance_queue_seconds_count",
        'appliance_errors_total{protocol="openai",status="401"}',
    ):
        assert name in text, name
    (backend,) = [line for line in text.splitlines() if line.startswith("appliance_backend_info{")]
    assert f'description="{describe(served.model.backend)}"' in backend  # e.g. cpu (avx2, 2 threads)
    generated = [line for line in text.splitlines() if line.startswith("appliance_tokens_generated_total")]
    assert float(generated[0].split()[-1]) >= 3
    if not gpu_present():
        assert "appliance_gpu_utilization_percent" not in text  # absent, not zero, without a GPU


def test_a_second_turn_reuses_the_first(client, url, served):
    """The prefix cache: turn 2 starts with turn 1's prompt and answer, whose KV it reuses; same greedy text."""
    turn = [{"role": "system", "content": "You answer in one short sentence. " * 8}, *QUESTION]
    first = client.chat.completions.create(model=served.name, messages=turn, temperature=0, max_tokens=12)
    follow = [*turn, {"role": "assistant", "content": first.choices[0].message.content}, *QUESTION]
    second = client.chat.completions.create(model=served.name, messages=follow, temperature=0, max_tokens=12)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    expected = served.generate(served.chat_ids(follow), SamplingParams(), 12)
    assert second.choices[0].message.content == expected.run()
    metrics = httpx.get(f"{url}/metrics").text
    hits = next(line for line in metrics.splitlines() if line.startswith("appliance_prefix_cache_hits_total"))
    assert float(hits.split()[-1]) >= 1 and "appliance_prefix_cache_bytes " in metrics
