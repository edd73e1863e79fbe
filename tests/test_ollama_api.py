"""Ollama's API (/api), driven by the official `ollama` client against a real server."""

from __future__ import annotations

import json
import re
import time

import httpx
import ollama
import pytest

from models.sampling import SamplingParams
from models.store import DEFAULT_MODEL
from tests.serving import running_server

KEY = "test-key"
QUESTION = [{"role": "user", "content": "Name the capital of France."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(model_path):
    with running_server("--max-batch", "4", key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def url(server):
    return server.url


@pytest.fixture(scope="module")
def client(url):
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
        yield h


def test_version_tags_show_ps(client, http, served, model_path):
    assert re.fullmatch(r"\d+\.\d+\.\d+", http.get("/api/version").json()["version"])
    assert http.head("/api/version").status_code == http.head("/api/tags").status_code == 200
    (listed,) = client.list().models
    assert listed.model == f"{served.name}:latest"
    assert listed.size == model_path.stat().st_size and listed.digest == DEFAULT_MODEL.sha256
    assert listed.details.format == "gguf" and listed.details.family == "llama"
    assert (listed.details.parameter_size, listed.details.quantization_level) == ("134.52M", "Q4_1")

    for name in (served.name, f"{served.name}:latest"):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools"]
        assert shown.template == served.model.file.metadata["tokenizer.chat_template"]
        info = shown.modelinfo
        assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
        assert info["general.parameter_count"] == 134515008 and info["tokenizer.ggml.tokens"] == []  # not verbose
        assert "num_ctx" in shown.parameters and '"<|im_end|>"' in shown.parameters

    (running,) = client.ps().models
    assert running.model == f"{served.name}:latest" and running.context_length == 8192
    assert running.size > 0 and running.size_vram == 0 and running.digest == DEFAULT_MODEL.sha256


def test_chat_equals_the_engine_and_openai(client, http, served):
    expected = served.generate(served.chat_ids(QUESTION), SamplingParams(), 40)
    text = expected.run()
    plain = client.chat(served.name, QUESTION, stream=False, options={**GREEDY, "num_predict": 40})
    assert plain.message.content == text and "Paris" in text
    assert plain.message.role == "assistant" and plain.done and plain.done_reason == expected.finish_reason == "stop"
    assert (plain.prompt_eval_count, plain.eval_count) == (expected.prompt_tokens, expected.completion_tokens)
    assert plain.total_duration >= plain.load_duration + plain.prompt_eval_duration + plain.eval_duration > 0

    parts = list(client.chat(f"{served.name}:latest", QUESTION, stream=True, options=GREEDY))
    assert len(parts) > 3 and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == text
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == expected.completion_tokens
    assert parts[-1].model == f"{served.name}:latest"  # echoed as asked

    openai = http.post("/v1/chat/completions", json={"model": served.name, "messages": QUESTION, "temperature": 0})
    assert openai.json()["choices"][0]["message"]["content"] == text


def test_generate_raw_and_templated(client, http, served):
    prompt = "The capital of France is"
    expected = served.generate(served.prompt_ids(prompt), SamplingParams(), 12)
    text = expected.run()
    options = {**GREEDY, "num_predict": 12}
    raw = client.generate(served.name, prompt, raw=True, options=options)
    assert raw.response == text and raw.done_reason == "length" and raw.eval_count == 12
    assert raw.prompt_eval_count == expected.prompt_tokens and raw.context is None
    streamed = list(client.generate(served.name, prompt, raw=True, options=options, stream=True))
    assert "".join(p.response for p in streamed) == text and streamed[-1].done
    completions = http.post(
        "/v1/completions", json={"model": served.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    )
    assert completions.json()["choices"][0]["text"] == text

    # not raw: the model's chat template around the prompt, the same as a one-message chat
    templated = client.generate(served.name, QUESTION[0]["content"], options=GREEDY)
    assert templated.response == served.generate(served.chat_ids(QUESTION), SamplingParams(), 40).run()
    assert len(templated.context) == templated.prompt_eval_count + templated.eval_count
    again = client.generate(
        served.name, "And of Italy?", context=templated.context, options={**GREEDY, "num_predict": 4}
    )
    assert again.prompt_eval_count > len(templated.context)  # the conversation goes on from the context


def test_options_are_honoured(client, served):
    prompt = "The capital of France is"
    full = served.generate(served.prompt_ids(prompt), SamplingParams(), 12).run()
    cut = client.generate(served.name, prompt, raw=True, options={**GREEDY, "num_predict": 12, "stop": ["."]})
    assert cut.response == full[: full.index(".")] and cut.done_reason == "stop"

    ask = {"seed": 11, "num_predict": 16}  # no temperature, top_k, top_p: Ollama's defaults 0.8, 40, 0.9
    a = client.generate(served.name, "Once upon a time", raw=True, options=ask)
    b = client.generate(served.name, "Once upon a time", raw=True, options=ask)
    ollama_defaults = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11)
    assert a.response == b.response == served.generate(served.prompt_ids("Once upon a time"), ollama_defaults, 16).run()
    other = client.generate(served.name, "Once upon a time", raw=True, options={**ask, "seed": 12})
    assert other.response != a.response


def test_a_body_is_json_whatever_its_content_type(http, served):
    """As Ollama reads it: its documentation's `curl -d '{...}'` sends a form's Content-Type."""
    body = json.dumps({"model": served.name, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = http.post("/api/generate", content=body, headers=form)
    assert r.status_code == 200 and r.json()["done"], r.text


def test_load_and_unload_answer_as_ollama_does(client, http, served):
    assert client.generate(served.name, "").done_reason == "load"
    nulls = {"model": served.name, "prompt": None, "stream": None, "options": None, "raw": None}  # as if left out
    assert http.post("/api/generate", json=nulls).json()["done_reason"] == "load"
    assert client.chat(served.name, [], keep_alive=0).done_reason == "unload"
    assert client.generate(served.name, "Hi", raw=True, options={"num_predict": 2}).eval_count <= 2  # loaded again


def _rss_mb(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1]) // 1024


def _unloaded(client, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.05)
    return not client.ps().models


def test_keep_alive_0_unloads_the_model_and_the_next_request_loads_it(client, server, served):
    """The weights' memory goes (the file's pages, read in place by the C kernels), /api/ps lists nothing; the
    next request loads them again and answers as before. A request with keep_alive 0 is answered, then unloads."""
    greedy = {"temperature": 0, "num_predict": 8}
    expected = client.generate(served.name, "Hi", raw=True, options=greedy).response
    assert client.ps().models
    loaded = _rss_mb(server.pid)
    assert client.generate(served.name, "", keep_alive=0).done_reason == "unload"
    assert _unloaded(client)
    freed = loaded - _rss_mb(server.pid)
    assert freed > 0.5 * DEFAULT_MODEL.size / 2**20, f"{freed} MiB freed by unloading a {DEFAULT_MODEL.size} B model"
    assert client.generate(served.name, "Hi", raw=True, options=greedy).response == expected
    assert client.ps().models
    assert client.generate(served.name, "Hi", raw=True, options=greedy, keep_alive="0s").response == expected
    assert _unloaded(client)


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/api/chat", {"model": "nope", "messages": QUESTION}, 404, "model 'nope' not found"),
        ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
        ("/api/generate", {"prompt": "hi"}, 400, "model"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "options": {"temperature": "hot"}}, 400, "temperature"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "options": {"num_ctx": 100000}}, 400, "context window"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "options": {"num_predict": 99999}}, 400, "num_predict"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "options": {"top_p": 0}}, 400, "top_p"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "raw": True, "system": "x"}, 400, "raw mode"),
        ("/api/generate", {"model": "{name}", "prompt": "hi", "context": [10**9]}, 400, "context"),
        ("/api/generate", {"model": "{name}", "prompt": "word " * 9000}, 400, "context window"),
        ("/api/chat", {"model": "{name}", "messages": QUESTION, "format": "yaml"}, 400, "format"),
        ("/api/chat", {"model": "{name}", "messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools"),
        ("/api/chat", {"model": "{name}", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/api/chat", {"model": "{name}", "messages": [{**QUESTION[0], "images": ["aGk="]}]}, 400, "vision"),
        ("/api/chat", {"model": "{name}", "messages": QUESTION, "think": True}, 400, "thinking"),
        ("/api/pull", {"model": "llama3.2"}, 501, "/api/chat"),
        ("/api/embed", {"model": "{name}", "input": "hi"}, 501, "embeddings"),
    ],
)
def test_errors_in_ollamas_shape(http, served, path, body, status, fragment):
    body = {k: (v.format(name=served.name) if k == "model" else v) for k, v in body.items()}
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and fragment in error


def test_the_client_sees_statuses(client, url, served):
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat("nope", QUESTION)
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(served.name, "hi", options={"num_ctx": 10**6})
    assert bad.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as no_key:
        ollama.Client(host=url).list()
    assert no_key.value.status_code == 401
    bad_json = httpx.post(f"{url}/api/chat", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert bad_json.status_code == 400 and isinstance(bad_json.json()["error"], str)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'appliance_requests_total{protocol="ollama"}' in metrics
    assert 'appliance_errors_total{protocol="ollama",status="404"}' in metrics


def test_a_stream_the_client_leaves_is_cancelled(url, http, served):
    body = {"model": served.name, "prompt": "Tell me a very long story.", "options": {"num_predict": 2000}}
    with httpx.stream("POST", f"{url}/api/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while http.get("/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.get("/health").json()["active"] == 0
