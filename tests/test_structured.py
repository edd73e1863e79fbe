"""Structured output and tool calls by constrained decoding, against a real server with the official clients:
JSON schemas through OpenAI's response_format, Ollama's format and Anthropic's output_config; required and named
tool calls whose arguments validate against the tool's parameters, streamed and not."""

from __future__ import annotations

import concurrent.futures
import json

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest

from models.tools import CallParser, parse
from tests.serving import running_server

KEY = "test-key"
GREEDY = {"temperature": 0}

# Every string and array bounded: each schema's grammar ends within max_tokens, whatever the model writes.
S = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "colour": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "bounded_number": {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["temperature"],
    },
    "flags": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 12}},
        "required": ["ok", "note"],
    },
    "tags": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {**S, "maxLength": 8}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {"name": S, "country": S, "population": {"type": "integer", "minimum": 0}},
                "required": ["name", "country"],
            }
        },
        "required": ["city"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    "enum_numbers": {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
    "const_and_ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"kind": {"const": "segment"}, "a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["kind", "a", "b"],
    },
    "any_of": {
        "type": "object",
        "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"enum": ["unknown"]}]}},
        "required": ["answer"],
    },
    "top_level_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2,
        "maxItems": 4,
    },
    "date_string": {
        "type": "object",
        "properties": {"date": {"type": "string", "format": "date"}},
        "required": ["date"],
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in an IANA time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def url(model_path):
    with running_server("--max-batch", "16", key=KEY) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, served, name, schema, **kw):
    return client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": f"Reply with a JSON {name.replace('_', ' ')}."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        max_tokens=kw.pop("max_tokens", 96),
        **GREEDY,
        **kw,
    )


def test_every_schema_validates(client, served):
    """A dozen schemas at once (one batch): each answer ends by the grammar ("stop") and validates."""
    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:
        replies = dict(zip(SCHEMAS, pool.map(lambda kv: _ask(client, served, *kv), SCHEMAS.items()), strict=True))
    for name, r in replies.items():
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_streamed_schema_output_validates(client, served):
    schema = SCHEMAS["nested"]
    chunks = list(_ask(client, served, "nested", schema, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_cut_off_answer_is_length_not_valid(client, served):
    """max_tokens ends the text before the grammar does: reported as "length", and the text is not yet JSON."""
    r = _ask(client, served, "nested", SCHEMAS["nested"], max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_json_mode(client, served, url):
    r = client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        **GREEDY,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a free-form object may run past max_tokens: then it is reported so, and is a prefix of an object
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    completion = client.completions.create(
        model=served.name,
        prompt="A JSON list of two primes: ",
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS["top_level_array"]}}},
        max_tokens=32,
        **GREEDY,
    )
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["top_level_array"])


def test_ollama_format(url, served):
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    schema = SCHEMAS["person"]
    reply = client.chat(served.name, ask, format=schema, options={"temperature": 0, "num_predict": 64})
    jsonschema.validate(json.loads(reply.message.content), schema)
    streamed = "".join(
        part.message.content
        for part in client.chat(
            served.name, ask, format=schema, stream=True, options={"temperature": 0, "num_predict": 64}
        )
    )
    assert streamed == reply.message.content
    generated = client.generate(
        served.name, "Give me a colour as JSON.", format=SCHEMAS["colour"], options={"temperature": 0}
    )
    jsonschema.validate(json.loads(generated.response), SCHEMAS["colour"])
    anything = client.generate(
        served.name, "Describe a cat as JSON.", format="json", options={"temperature": 0, "num_predict": 48}
    )
    assert anything.done_reason == "length" or isinstance(json.loads(anything.response), dict)


def test_anthropic_output_format(url, served):
    client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    schema = SCHEMAS["colour"]
    message = client.messages.create(
        model=served.name,
        max_tokens=32,
        messages=[{"role": "user", "content": "Pick a colour."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), schema)


@pytest.mark.parametrize(
    "path,body",
    [
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
        ),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        ),
        ("/v1/chat/completions", {"tool_choice": "required"}),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}),
        (
            "/v1/chat/completions",
            {
                "tools": [{**TIME, "function": {**TIME["function"], "parameters": {"type": 7}}}],
                "tool_choice": "required",
            },
        ),
        ("/api/chat", {"format": {"type": "nonsense"}}),
        ("/api/chat", {"format": "yaml"}),
        (
            "/v1/messages",
            {"max_tokens": 8, "output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}},
        ),
    ],
)
def test_bad_schemas_and_tools_are_400(url, served, path, body):
    body = {"model": served.name, "messages": [{"role": "user", "content": "Hi"}], **body}
    r = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert any(word in message for word in ("schema", "format", "tool", "Invalid", "invalid")), message


def _check_call(call, tool):
    assert call.type == "function" and call.function.name == tool["function"]["name"] and call.id
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_forced_tool_calls_validate(client, served):
    """tool_choice required (plain) and a named function (streamed): one call each, its arguments valid."""
    r = client.chat.completions.create(
        model=served.name, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64, **GREEDY
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_call(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])

    named = {"type": "function", "function": {"name": "get_time"}}
    with client.chat.completions.stream(
        model=served.name, messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=64, **GREEDY
    ) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1  # the arguments arrive piece by piece
    assert final.choices[0].finish_reason == "tool_calls"
    (streamed,) = final.choices[0].message.tool_calls
    _check_call(streamed, TIME)
    assert "".join(d.arguments_delta for d in deltas) == streamed.function.arguments


def test_a_conversation_with_tool_results(client, served):
    """An earlier call and its result go back in the next request; tool_choice none answers in text."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = client.chat.completions.create(
        model=served.name, messages=turns, tools=[WEATHER], tool_choice="none", max_tokens=16, **GREEDY
    )
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_ollama_tools(url, served):
    """Ollama has no forced tool choice: the model's own call (if it makes one) comes back parsed; the history with
    a call and its result is accepted."""
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    turns = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}],
        },
        {"role": "tool", "content": '{"temperature": 21}'},
    ]
    reply = client.chat(served.name, turns, tools=[WEATHER], options={"temperature": 0, "num_predict": 24})
    assert reply.message.content or reply.message.tool_calls
    assert "tools" in client.show(served.name).capabilities


def test_the_call_parser_streams_arguments():
    text = (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, 2]}}}\n</tool_call>\n'
        'and <tool_call>{"arguments": {}, "name": "g"}</tool_call> done <tool'
    )
    parser, events = CallParser(), []
    for i in range(0, len(text), 3):
        events += parser.feed(text[i : i + 3])
    events += parser.finish()
    assert [c.name for c in parser.calls] == ["f", "g"]
    assert "".join(e.text for e in events if e.kind == "arguments" and e.index == 0) == '{"a": {"b": [1, 2]}}'
    assert json.loads(parser.calls[1].arguments) == {}
    assert parser.content == "Let me check.and  done <tool"
    assert sum(e.kind == "arguments" and e.index == 0 for e in events) > 1
    assert parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_anthropic_tool_use(url, served):
    """tool_choice "tool" forces a call: a tool_use block whose input validates, plain and streamed alike."""
    client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    fn = WEATHER["function"]
    ask = {
        "model": served.name,
        "max_tokens": 64,
        "messages": ASK,
        "tools": [{"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": GREEDY,
    }
    message = client.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, fn["parameters"])
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]
