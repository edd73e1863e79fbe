"""Anthropic's Messages API (/v1/messages), driven by the official `anthropic` client against a real server."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest

from appliance.serving.anthropic_api import _events
from appliance.serving.scheduler import Event, Ticket, TokenStream
from models.sampling import SamplingParams
from tests.serving import ADMIN_KEY, running_server

KEY = "test-key"
QUESTION = [{"role": "user", "content": "Name the capital of France."}]
SYSTEM = "You answer in one short sentence."
# This client (anthropic 2.x) has dropped temperature, top_p and top_k from its arguments; the API still takes them
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def url(model_path):
    with running_server("--max-batch", "1", "--max-queue", "1", key=KEY) as server:  # one running, one waiting
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def greedy(served):
    """The engine's own greedy answer to QUESTION (40 tokens at most): what every served text must equal."""
    gen = served.generate(served.chat_ids(QUESTION), SamplingParams(), 40)
    gen.run()
    return gen


def test_message_equals_the_engine_and_openai(client, url, served, greedy):
    m = client.messages.create(model=served.name, max_tokens=40, messages=QUESTION, **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.model == served.name and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == greedy.text and "Paris" in greedy.text
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    assert (m.usage.input_tokens, m.usage.output_tokens) == (greedy.prompt_tokens, greedy.completion_tokens)

    body = {"model": served.name, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    openai = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert openai.json()["choices"][0]["message"]["content"] == greedy.text


def test_stream_equals_plain(client, served, greedy):
    with client.messages.stream(model=served.name, max_tokens=40, messages=QUESTION, **GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == greedy.text
    assert final.content[0].text == greedy.text and final.stop_reason == "end_turn" and final.stop_sequence is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (greedy.prompt_tokens, greedy.completion_tokens)


def test_the_events_on_the_wire(url, served):
    """Event names and shapes as Anthropic sends them (the client's parser forgives some; others may not)."""
    body = {"model": served.name, "max_tokens": 5, "messages": QUESTION, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [_event(e) for e in r.read().decode().split("\n\n") if e.strip()]
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5


def _event(text: str) -> tuple[str, dict]:
    """One server-sent event's name and data."""
    name, data = text.split("\n")
    return name.removeprefix("event: "), json.loads(data.removeprefix("data: "))


def test_stop_sequences_and_max_tokens(client, served, greedy):
    word = "Paris"
    m = client.messages.create(
        model=served.name, max_tokens=40, messages=QUESTION, **GREEDY, stop_sequences=["no such text", word]
    )
    assert m.content[0].text == greedy.text[: greedy.text.index(word)]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", word)

    with client.messages.stream(
        model=served.name, max_tokens=40, messages=QUESTION, **GREEDY, stop_sequences=[word]
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", word)

    short = client.messages.create(model=served.name, max_tokens=3, messages=QUESTION, **GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    assert greedy.text.startswith(short.content[0].text)


def test_system_prompt_as_a_string_and_as_blocks(client, served):
    expected = served.generate(
        served.chat_ids([{"role": "system", "content": SYSTEM}, *QUESTION]), SamplingParams(), 24
    )
    expected.run()
    ask = dict(model=served.name, max_tokens=24, messages=QUESTION, **GREEDY)
    assert client.messages.create(**ask, system=SYSTEM).content[0].text == expected.text
    halves = [{"type": "text", "text": SYSTEM[:10]}, {"type": "text", "text": SYSTEM[10:]}]
    blocks = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    assert client.messages.create(**{**ask, "messages": blocks}, system=halves).content[0].text == expected.text


def test_count_tokens(client, served):
    counted = client.messages.count_tokens(model=served.name, messages=QUESTION, system=SYSTEM)
    assert counted.input_tokens == len(served.chat_ids([{"role": "system", "content": SYSTEM}, *QUESTION]))


def test_errors_are_anthropic_s(client, url, served):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)
    assert e.value.body["error"]["type"] == "not_found_error" and "no-such-model" in e.value.message

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    for bad in (
        {"max_tokens": 0},
        {"extra_body": {"temperature": 1.5}},
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]},
        {"messages": [{"role": "system", "content": "Hi"}]},
        {"tools": [{"name": "f", "input_schema": {"type": 7}}], "tool_choice": {"type": "any"}},
    ):
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(**{"model": served.name, "max_tokens": 4, "messages": QUESTION, **bad})
        assert e.value.body["error"]["type"] == "invalid_request_error"

    only_image = {"model": served.name, "max_tokens": 4, "messages": [{"role": "user", "content": [image]}]}
    r = httpx.post(f"{url}/v1/messages", json=only_image, headers={"x-api-key": KEY})
    assert r.status_code == 400 and "'image'" in r.json()["error"]["message"]
    missing = httpx.post(
        f"{url}/v1/messages", json={"model": served.name, "messages": QUESTION}, headers={"x-api-key": KEY}
    )
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]

    with pytest.raises(anthropic.APIStatusError) as e:  # over the server's body limit (1 MiB)
        client.messages.create(model=served.name, max_tokens=4, messages=[{"role": "user", "content": "x" * (2 << 20)}])
    assert e.value.status_code == 413 and e.value.body["error"]["type"] == "request_too_large"


def test_keys(url, served):
    wrong = anthropic.Anthropic(base_url=url, api_key="wrong-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=served.name, max_tokens=4, messages=QUESTION)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    body = {"model": served.name, "max_tokens": 2, "messages": QUESTION}
    assert httpx.post(f"{url}/v1/messages", json=body).status_code == 401
    assert httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": ""}).status_code == 401
    assert httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": "wrong-key"}).status_code == 401
    admin = {"x-api-key": ADMIN_KEY}  # administration still takes its key as a bearer token only
    assert httpx.get(f"{url}/admin/status", headers=admin).status_code == 401
    by_header = anthropic.Anthropic(base_url=url, api_key=None, default_headers={"x-api-key": KEY}, max_retries=0)
    assert by_header.messages.create(model=served.name, max_tokens=2, messages=QUESTION).usage.output_tokens == 2


def test_a_full_queue_is_a_rate_limit_error_and_abandoned_streams_free_their_slots(client, url, served):
    ask = dict(model=served.name, max_tokens=2000, messages=[{"role": "user", "content": "Tell me a very long story."}])
    with client.messages.stream(**ask) as running, client.messages.stream(**ask):
        next(iter(running.text_stream))
        assert _load(url) == (1, 1)
        with pytest.raises(anthropic.RateLimitError) as e:
            client.messages.create(**ask)
        assert e.value.body["error"]["type"] == "rate_limit_error" and e.value.response.headers["retry-after"]
    deadline = time.monotonic() + 20
    while sum(_load(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _load(url) == (0, 0)


def _load(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health").json()
    return health["active"], health["waiting"]


def test_a_failure_mid_stream_is_an_error_event(served):
    """Once the headers are gone a failure cannot be a status: it is Anthropic's `error` event, and the last."""
    gen = served.generate(served.chat_ids(QUESTION), SamplingParams(), 4)

    async def events() -> list[str]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        for event in (Event("text", "Par"), Event("error", "generation failed: boom")):
            queue.put_nowait(event)
        return [e async for e in _events(TokenStream(Ticket(gen, lambda e: None), queue), gen, "msg_1", "m")]

    sent = [_event(e.strip()) for e in asyncio.run(events())]
    assert [name for name, _ in sent] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "error",
    ]
    assert sent[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "generation failed: boom"}}
