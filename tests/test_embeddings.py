"""/v1/embeddings through the real `openai` client against a real server: pooled hidden states that are
deterministic, independent of what shares their batch, and the engine's own."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from models.llama import Session
from tests.serving import running_server

KEY = "embed-key"
TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Ünïcödé and 日本語 🙂"]


@pytest.fixture(scope="module")
def server(model_path):
    with running_server(key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(engine, text: str) -> np.ndarray:
    """Mean of the final-normed last-layer states over every position, unit length."""
    pooled = engine.model.final_norm(engine.hidden_states(engine.tokenizer.encode(text), Session())).mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def test_each_input_is_its_pooled_unit_vector(client, served):
    r = client.embeddings.create(model=served.name, input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, text in zip(r.data, TEXTS, strict=True):
        v = np.array(d.embedding)
        assert v.shape == (served.model.config.dim,) and abs(np.linalg.norm(v) - 1) < 1e-5
        np.testing.assert_allclose(v, expected(served, text), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(served.tokenizer.encode(t)) for t in TEXTS)


def test_deterministic_and_batch_invariant(client, served):
    """The same text alone, first or last among others, and again: the same vector bit for bit."""
    alone = client.embeddings.create(model=served.name, input=TEXTS[1]).data[0].embedding
    assert client.embeddings.create(model=served.name, input=TEXTS[1]).data[0].embedding == alone
    batched = client.embeddings.create(model=served.name, input=[TEXTS[0], TEXTS[1], TEXTS[2]]).data[1].embedding
    assert batched == alone


def test_token_ids_and_base64(server, served):
    ids = served.tokenizer.encode(TEXTS[0])
    headers = {"Authorization": f"Bearer {KEY}"}
    text = httpx.post(f"{server.url}/v1/embeddings", json={"model": served.name, "input": TEXTS[0]}, headers=headers)
    by_ids = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": served.name, "input": [ids], "encoding_format": "base64"},
        headers=headers,
    )
    assert text.status_code == by_ids.status_code == 200
    decoded = np.frombuffer(base64.b64decode(by_ids.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(text.json()["data"][0]["embedding"], dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"input": []}, 400, "must not be empty"),
        ({"input": [""]}, 400, "empty"),
        ({"input": ["x"] * 33}, 400, "at most 32"),
        ({"input": [[1, 2, 10**9]]}, 400, "token ids must be in"),
        ({"input": "x", "dimensions": 7}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "gpt-4"}, 404, "does not exist"),
    ],
)
def test_bad_requests_are_clear_errors(server, served, body, status, says):
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": served.name, **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_over_the_context_window_is_refused(server, served):
    ids = [42] * (served.model.config.context_length + 1)
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": served.name, "input": [ids]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]


def test_needs_a_key(server, served):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": served.name, "input": "x"})
    assert r.status_code == 401
