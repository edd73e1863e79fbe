"""OpenAI's logprobs (chat's `logprobs`/`top_logprobs`, completions' `logprobs` with `echo`), driven by the
official `openai` client against a real server and held to the engine's own logits."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient

from models.llama import Session
from models.logprobs import log_softmax
from tests.serving import running_server

KEY = "logprobs-key"
QUESTION = [{"role": "user", "content": "Name the capital of France."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(model_path):
    with running_server(key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def engine_logprobs(served, ids: list[int], n: int) -> list[np.ndarray]:
    """log_softmax of the engine's logits after each of the last n prefixes of ids, one step at a time."""
    session, rows = Session(), []
    rows.append(served.next_logits(ids[: len(ids) - n], session))
    for token in ids[len(ids) - n : -1]:
        rows.append(served.next_logits([token], session))
    return [log_softmax(r) for r in rows]


def test_chat_logprobs_are_the_models(client, served):
    r = client.chat.completions.create(
        model=served.name, messages=QUESTION, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    ids = [*served.chat_ids(QUESTION), *(served.tokenizer.encode(r.choices[0].message.content))]
    want = engine_logprobs(served, ids, len(content))
    for t, lp, token in zip(content, want, ids[-len(content) :], strict=True):
        assert len(t.top_logprobs) == 5
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the top-1
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes) == served.tokenizer.token_bytes(token)
        assert t.logprob == pytest.approx(lp[token], abs=1e-4)
        best = np.argsort(-lp)[:5]
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(list(lp[best]), abs=1e-4)


def test_chat_streamed_logprobs_equal_plain(client, served):
    ask = dict(model=served.name, messages=QUESTION, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in plain]
    for c in chunks:  # each chunk carries the tokens of its own text
        if c.choices[0].delta.content and c.choices[0].finish_reason is None:
            assert "".join(t.token for t in c.choices[0].logprobs.content) == c.choices[0].delta.content


def test_no_logprobs_unless_asked(client, served):
    r = client.chat.completions.create(model=served.name, messages=QUESTION, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None
    c = client.completions.create(model=served.name, prompt=PROMPT, temperature=0, max_tokens=4)
    assert c.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt(client, server, served):
    r = client.completions.create(model=served.name, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=3, echo=True)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    prompt = served.prompt_ids(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(prompt) + r.usage.completion_tokens
    # the prompt's: what the KServe NAME-logits model gives for each prefix
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    for k in (1, 3, len(prompt) - 1):
        ids = np.array(prompt[:k], dtype=np.int64)
        t = httpclient.InferInput("input_ids", [k], "INT64")
        t.set_data_from_numpy(ids)
        logprobs = http.infer(f"{served.name}-logits", [t], headers={"authorization": f"Bearer {KEY}"})
        assert lp.token_logprobs[k] == pytest.approx(float(logprobs.as_numpy("logprobs")[prompt[k]]), abs=1e-4)
    # the generated ones: greedy, so the top-1 of each is the token itself
    for token, value, top in zip(
        lp.tokens[len(prompt) :], lp.token_logprobs[len(prompt) :], lp.top_logprobs[len(prompt) :], strict=True
    ):
        assert len(top) == 3 and max(top, key=top.get) == token and top[token] == value


def test_max_tokens_0_with_echo_only_scores(client, served):
    r = client.completions.create(model=served.name, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    choice = r.choices[0]
    assert choice.text == PROMPT and "".join(choice.logprobs.tokens) == PROMPT
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(served.prompt_ids(PROMPT))
    assert choice.logprobs.token_logprobs[0] is None and all(v < 0 for v in choice.logprobs.token_logprobs[1:])
    with_gen = client.completions.create(model=served.name, prompt=PROMPT, max_tokens=3, logprobs=0, echo=True)
    n = len(choice.logprobs.tokens)
    assert with_gen.choices[0].logprobs.token_logprobs[:n] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-9)


def test_a_list_of_prompts_as_text_or_token_ids(client, served):
    """OpenAI's prompt forms (lm-eval sends token ids, several at once): each prompt's choices are those it gets
    alone, in order; usage counts each prompt once; echo scores each prompt; streamed choices are the same."""
    other = "Once upon a time"
    greedy = dict(model=served.name, temperature=0, max_tokens=6)
    alone = [client.completions.create(prompt=p, **greedy).choices[0].text for p in (PROMPT, other)]
    ids = [served.prompt_ids(p) for p in (PROMPT, other)]
    for prompt in ([PROMPT, other], ids):
        r = client.completions.create(prompt=prompt, n=2, **greedy)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
        assert r.usage.prompt_tokens == sum(map(len, ids))
    assert client.completions.create(prompt=ids[1], **greedy).choices[0].text == alone[1]
    scored = client.completions.create(model=served.name, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    for choice, text in zip(scored.choices, (PROMPT, other), strict=True):
        one = client.completions.create(model=served.name, prompt=text, max_tokens=0, logprobs=0, echo=True)
        assert choice.text == text
        assert choice.logprobs.token_logprobs == pytest.approx(one.choices[0].logprobs.token_logprobs, abs=1e-9)
    chunks = [c.choices[0] for c in client.completions.create(prompt=[PROMPT, other], stream=True, **greedy)]
    assert ["".join(c.text for c in chunks if c.index == i) for i in (0, 1)] == alone


def test_completion_streamed_logprobs_equal_plain(client, served):
    ask = dict(model=served.name, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2, echo=True)
    plain = client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == plain.text
    parts = [c.logprobs for c in chunks if c.logprobs]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in getattr(p, field)] == getattr(plain.logprobs, field)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ("chat/completions", {"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": [[]]}, "prompt"),
        ("completions", {"prompt": [1, 10**9]}, "prompt"),
        ("completions", {"prompt": [PROMPT] * 33, "n": 2}, "prompt"),
    ],
)
def test_bad_values(server, served, path, body, param):
    r = httpx.post(
        f"{server.url}/v1/{path}",
        json={"model": served.name, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in error["message"]


def test_echo_in_chunks_equals_one_pass(served):
    """The scheduler feeds a long prompt in chunks: each chunk's rows score the ids after them."""
    ids = served.prompt_ids("One, two, three, four, five, six, seven, eight.")
    whole = served.generate(ids, max_tokens=2, logprobs=1, echo=True)
    whole.run()
    chunked = served.generate(ids, max_tokens=2, logprobs=1, echo=True)
    while not chunked.done:
        step = chunked.next_input(prefill_chunk=3)
        logits, hiddens = served.step([step], [chunked.session])
        chunked.advance(len(step), logits[0], hiddens[0])
    assert len(chunked.prompt_logprobs) == len(ids) and chunked.prompt_logprobs[0] is None
    for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:], strict=True):
        assert a.id == b.id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert [lp.id for lp in chunked.logprobs] == chunked.token_ids == whole.token_ids


def test_a_stop_string_drops_the_logprobs_past_it(served):
    full = served.generate(served.prompt_ids(PROMPT), max_tokens=12, logprobs=0)
    full.run()
    cut = served.generate(served.prompt_ids(PROMPT), max_tokens=12, stop=["."], logprobs=0)
    cut.run()
    tok = served.tokenizer
    assert "".join(tok.token_piece(lp.id) for lp in cut.logprobs) == cut.text == full.text[: full.text.index(".")]


def test_nothing_is_computed_unless_asked(served):
    g = served.generate(served.prompt_ids(PROMPT), max_tokens=3)
    g.run()
    assert g.logprobs == [] and g.piece_tokens == [] and g.prompt_logprobs == [None]
