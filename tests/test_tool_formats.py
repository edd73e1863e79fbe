"""Tool calls in each family's own format, with the chat templates the families ship (as llama.cpp keeps them in
its sources): the prompt with tools, earlier calls and results renders as transformers renders it; a Llama 3
template gets Llama's JSON calls (`{"name", "parameters"}`), forced by the grammar, parsed back and served."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from models.chat import ChatTemplate
from models.engine import Engine
from models.tools import HERMES, LLAMA3, MISTRAL, CallParser, Tool, call_grammar, nine, parse, render, tool_format
from tests import hf_models
from tests.serving import running_server
from tests.test_structured import ASK, KEY, TIME, WEATHER

TEMPLATES = {  # file in llama.cpp's models/templates: the format its model writes
    "meta-llama-Llama-3.1-8B-Instruct.jinja": LLAMA3,
    "meta-llama-Llama-3.2-3B-Instruct.jinja": LLAMA3,
    "meta-llama-Llama-3.3-70B-Instruct.jinja": LLAMA3,
    "Qwen-Qwen2.5-7B-Instruct.jinja": HERMES,
    "Qwen-Qwen3-0.6B.jinja": HERMES,
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": MISTRAL,
}
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "abcdefghi"}
RESULT = {
    "role": "tool",
    "content": json.dumps({"temperature": 21, "sky": "clear <and> 'dry'"}),
    "tool_call_id": "abcdefghi",
}
CONVERSATION = [
    {"role": "system", "content": "You are the assistant of a home."},
    *ASK,
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    RESULT,
]


def _template(name: str) -> str:
    return (hf_models.llama_cpp_dir() / "models" / "templates" / name).read_text()


@pytest.fixture(scope="module")
def hf_tokenizer(model_path, tmp_path_factory):
    return AutoTokenizer.from_pretrained(hf_models.save_smollm2_tokenizer(model_path, tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("name", TEMPLATES)
def test_tools_calls_and_results_render_as_transformers_renders_them(name, hf_tokenizer):
    source = _template(name)
    ours = ChatTemplate(source, bos_token=hf_tokenizer.bos_token or "", eos_token=hf_tokenizer.eos_token or "")
    assert tool_format(ours) == (TEMPLATES[name], True)
    tools = [
        Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"]) for t in (WEATHER, TIME)
    ]
    hf_turns = [
        {
            **m,
            "tool_calls": [
                {"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in m["tool_calls"]
            ],
        }
        if "tool_calls" in m
        else m
        for m in CONVERSATION
    ]
    for turns, hf in ((CONVERSATION, hf_turns), (CONVERSATION[:2], hf_turns[:2])):
        theirs = hf_tokenizer.apply_chat_template(
            hf, tools=[WEATHER, TIME], chat_template=source, tokenize=False, add_generation_prompt=True
        )
        assert render(ours, turns, tools) == theirs
    assert "get_time" in theirs and "clear <and>" in render(ours, CONVERSATION, tools)


def test_the_llama3_parser_reads_a_reply_that_is_a_call():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": {"x": [1]}}}'
    for step in (1, 5, len(text)):
        parser, events = CallParser(LLAMA3), []
        for i in range(0, len(text), step):
            events += parser.feed(text[i : i + step])
        events += parser.finish()
        (call,) = parser.calls
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "unit": {"x": [1]}}
        assert "".join(e.text for e in events if e.kind == "arguments") == call.arguments and parser.content == ""
    for plain in (" Paris is sunny, {mostly}.", '{"answer": 3}', "<|python_"):  # text, not calls
        parser = CallParser(LLAMA3)
        parser.feed(plain)
        parser.finish()
        assert parser.calls == [] and parser.content == plain


def test_the_mistral_parser_reads_a_list_of_calls_and_ids_are_nine_characters():
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    content, calls = parse(text, MISTRAL)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    assert parse("[1, 2] is a list", MISTRAL) == ("[1, 2] is a list", [])
    assert parse("Paris is sunny.", MISTRAL) == ("Paris is sunny.", [])
    assert nine("abcdefghi", 0) == "abcdefghi" and nine("call_0123", 0) == nine("call_0123", 5) != "call_0123"


@pytest.fixture(scope="module")
def llama3_file(model_path, tmp_path_factory):
    """The default model with Llama 3.2's chat template instead of its own: it writes Llama's calls."""
    out = tmp_path_factory.mktemp("llama3") / "smollm2-llama3-template.gguf"
    template = _template("meta-llama-Llama-3.2-3B-Instruct.jinja")
    return hf_models.with_metadata(model_path, out, **{"tokenizer.chat_template": template})


def test_a_forced_call_is_written_in_llamas_json(llama3_file):
    engine = Engine.load(llama3_file, "auto")
    assert engine.tool_format is LLAMA3
    tools = [Tool("get_weather", "", WEATHER["function"]["parameters"])]
    constraint = engine.grammars.constraint(call_grammar(engine.grammars, tools, engine.tool_format))
    gen = engine.generate(engine.chat_ids(ASK, tools), max_tokens=64, constraint=constraint)
    gen.run()
    call = json.loads(gen.text)  # the whole reply is the call
    assert set(call) == {"name", "parameters"} and call["name"] == "get_weather"
    jsonschema.validate(call["parameters"], WEATHER["function"]["parameters"])


def test_llama3_tool_calls_through_the_openai_client(llama3_file):
    with running_server("--model", str(llama3_file), key=KEY) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        model = llama3_file.stem
        r = client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64, temperature=0
        )
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        (call,) = r.choices[0].message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        with client.chat.completions.stream(
            model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0
        ) as stream:
            deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
            final = stream.get_final_completion()
        (streamed,) = final.choices[0].message.tool_calls
        assert len(deltas) > 1 and "".join(d.arguments_delta for d in deltas) == streamed.function.arguments
        jsonschema.validate(json.loads(streamed.function.arguments), WEATHER["function"]["parameters"])
        earlier = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
        turns = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [earlier]},
            {**RESULT, "tool_call_id": "call_1"},
        ]
        answer = client.chat.completions.create(
            model=model, messages=turns, tools=[WEATHER], max_tokens=8, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_mistral_tool_calls_through_the_openai_client(model_path, tmp_path):
    """The default model with Mistral Nemo's template: a forced call is Mistral's list, parsed back with a
    nine-character id; the next request with that call and its result renders (the template checks the ids)."""
    template = _template("mistralai-Mistral-Nemo-Instruct-2407.jinja")
    path = hf_models.with_metadata(
        model_path, tmp_path / "smollm2-mistral-template.gguf", **{"tokenizer.chat_template": template}
    )
    with running_server("--model", str(path), key=KEY) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model=path.stem, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0
        )
        (call,) = r.choices[0].message.tool_calls
        assert len(call.id) == 9 and call.id.isalnum() and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        earlier = {
            "id": call.id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments},
        }
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
        turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [earlier]}, result]
        answer = client.chat.completions.create(
            model=path.stem, messages=turns, tools=[WEATHER], max_tokens=8, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
