"""Anthropic's Messages API: POST /v1/messages (plain and SSE streaming) and /v1/messages/count_tokens, on the
same port as the others, so the official `anthropic` client and the coding assistants built on it work.

Fields follow Anthropic's API: `max_tokens` is required, `system` stands beside `messages`, content is a
string or a list of text, tool_use and tool_result blocks (images and documents are refused with a 400);
`tools` with `tool_choice` (auto, any, tool, none: any and tool are forced by the grammar) answer with tool_use
blocks, and `output_config.format` (a JSON schema) constrains the text. Sampling defaults are Anthropic's
(temperature 1, in [0, 1]). Every request becomes a Generation through `ServerState.generation()` and runs
on the one scheduler. Errors come in Anthropic's shape (errors.py picks it by path); the key may come as
`x-api-key` (auth.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.serving.auth import authorize
from appliance.serving.disconnect import unless_client_leaves
from appliance.serving.errors import anthropic_error_body
from appliance.serving.fields import Text
from appliance.serving.scheduler import GenerationError, TokenStream, drain
from appliance.serving.state import ServerState, server_state
from appliance.serving.structured import choose, forced_grammar, schema_grammar, tool
from models.engine import Generation
from models.sampling import SamplingParams
from models.tools import CallParser, Tool, ToolCall, parse


class Block(BaseModel):
    """A content block: text, tool_use (an earlier call) or tool_result (its answer); cache_control, citations
    and the like are ignored."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = None
    name: Text | None = None  # tool_use
    input: dict | None = None  # tool_use
    content: Text | list[Block] | None = None  # tool_result


Block.model_rebuild()  # tool_result content holds blocks


class Turn(BaseModel):
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class _Conversation(BaseModel):
    """What a message and a token count share: the model and the prompt."""

    model_config = ConfigDict(extra="allow")  # fields of Anthropic's this server does not use are ignored

    model: Text
    messages: list[Turn] = Field(min_length=1)
    system: Text | list[Block] | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None  # {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Text] | None = None
    temperature: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)  # 0 keeps all
    stream: bool = False
    metadata: dict | None = None
    output_config: dict | None = None  # {"format": {"type": "json_schema", "schema": {...}}}


router = APIRouter(prefix="/v1/messages", dependencies=[Depends(authorize)])
State = Annotated[ServerState, Depends(server_state)]


def _text(content: str | list[Block], where: str) -> str:
    """A turn's text: the string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    for block in content:
        if block.type != "text" or block.text is None:
            raise HTTPException(400, f"{where}: content blocks of type {block.type!r} are not supported here")
    return "".join(block.text or "" for block in content)


def _turns(m: Turn, where: str) -> list[dict]:
    """A message as models/tools.py renders turns: tool_use blocks are the assistant's calls, each tool_result
    a tool turn of its own."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    turns, text, calls = [], [], []
    for i, block in enumerate(m.content):
        if block.type == "tool_use" and m.role == "assistant":
            calls.append({"name": block.name or "", "arguments": block.input or {}})
        elif block.type == "tool_result" and m.role == "user":
            content = block.content if block.content is not None else ""
            turns.append({"role": "tool", "content": _text(content, f"{where}.{i}.content")})
        else:
            text.append(_text([block], f"{where}.{i}"))
    if text or calls:
        turns.append({"role": m.role, "content": "".join(text), **({"tool_calls": calls} if calls else {})})
    return turns


def _tools(body: _Conversation) -> tuple[list[Tool], list[Tool]]:
    """(offered, forced) from Anthropic's tools and tool_choice."""
    tools = [
        tool(t.get("name"), t.get("description"), t.get("input_schema"), f"tools.{i}")
        for i, t in enumerate(body.tools or [])
    ]
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise HTTPException(400, "tool_choice.type must be auto, any, tool or none")
    return choose(tools, {"any": "required", "tool": choice.get("name")}.get(kind, kind))


def _prompt_ids(state: ServerState, body: _Conversation) -> list[int]:
    """404 for a model not served, 400 for what this one cannot do; else the prompt in the model's chat template."""
    try:
        state.adapter_for(body.model)
    except LookupError:
        available = ", ".join(state.model_names())
        raise HTTPException(404, f"model: {body.model} not found; available: {available}") from None
    turns = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        turns += _turns(m, f"messages.{i}.content")
    return state.engine.chat_ids(turns, _tools(body)[0])


def _grammar(state: ServerState, body: MessagesRequest) -> str | None:
    forced = forced_grammar(state, _tools(body)[1])
    fmt = (body.output_config or {}).get("format")
    if forced or fmt is None:
        return forced
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise HTTPException(400, "output_config.format is {'type': 'json_schema', 'schema': {...}}")
    return schema_grammar(state, fmt["schema"])


def _use(call: ToolCall) -> dict:
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        value = {}
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name, "input": value}


def _stop_reason(gen: Generation, called: bool = False) -> str:
    if gen.finish_reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if gen.stop_sequence is not None else "end_turn"


def _message(gen: Generation, id_: str, model: str, content: list[dict], done: bool, called: bool = False) -> dict:
    """The message as Anthropic sends it: whole (done), or as message_start opens a stream."""
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(gen, called) if done else None,
        "stop_sequence": gen.stop_sequence if done else None,
        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens if done else 0},
    }


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


async def _events(
    stream: TokenStream, gen: Generation, id_: str, model: str, tools: bool = False
) -> AsyncIterator[str]:
    """Anthropic's event sequence: a text block, and with tools a tool_use block per call (its input streamed as
    input_json_delta); a failure once the headers are gone is an error event."""
    parser = CallParser(gen.engine.tool_format) if tools else None
    blocks: list[str] = []  # the kinds of the blocks opened, the last one open

    def start(block: dict) -> str:
        closing = _event("content_block_stop", {"index": len(blocks) - 1}) if blocks else ""
        blocks.append(block["type"])
        return closing + _event("content_block_start", {"index": len(blocks) - 1, "content_block": block})

    def text(piece: str) -> str:
        opening = "" if blocks and blocks[-1] == "text" else start({"type": "text", "text": ""})
        delta = {"index": len(blocks) - 1, "delta": {"type": "text_delta", "text": piece}}
        return opening + _event("content_block_delta", delta)

    def translate(events) -> str:
        out = ""
        for e in events:
            if e.kind == "content":
                out += text(e.text)
            elif e.kind == "call":
                out += start({**_use(parser.calls[e.index]), "input": {}})
            else:
                delta = {"index": len(blocks) - 1, "delta": {"type": "input_json_delta", "partial_json": e.text}}
                out += _event("content_block_delta", delta)
        return out

    try:
        yield _event("message_start", {"message": _message(gen, id_, model, [], done=False)})
        if parser is None:
            yield start({"type": "text", "text": ""})
        yield _event("ping", {})
        try:
            async for piece in stream:
                out = text(piece) if parser is None else translate(parser.feed(piece))
                if out:
                    yield out
            if parser is not None:
                yield translate(parser.finish())
        except GenerationError as e:
            yield _event("error", anthropic_error_body(str(e), 500))
            return
        if not blocks:
            yield start({"type": "text", "text": ""})
        yield _event("content_block_stop", {"index": len(blocks) - 1})
        called = bool(parser and parser.calls)
        delta = {"stop_reason": _stop_reason(gen, called), "stop_sequence": gen.stop_sequence}
        yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": gen.completion_tokens}})
        yield _event("message_stop", {})
    finally:  # also when the client disconnects mid-stream
        stream.cancel()


@router.post("")
async def messages(request: Request, body: MessagesRequest, state: State):
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
    ids, grammar, tools = _prompt_ids(state, body), _grammar(state, body), bool(_tools(body)[0])
    gen = state.generation(ids, sampling, body.max_tokens, body.stop_sequences or [], model=body.model, grammar=grammar)
    stream = state.scheduler.stream(gen)  # admitted now: a full queue is a 429, not a broken stream
    id_ = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(_events(stream, gen, id_, body.model, tools), media_type="text/event-stream")
    await unless_client_leaves(request, drain([stream]))
    text, calls = parse(gen.text, gen.engine.tool_format) if tools else (gen.text, [])
    content = ([{"type": "text", "text": text}] if text or not calls else []) + [_use(c) for c in calls]
    return _message(gen, id_, body.model, content, done=True, called=bool(calls))


@router.post("/count_tokens")
async def count_tokens(body: _Conversation, state: State) -> dict:
    return {"input_tokens": len(_prompt_ids(state, body))}
