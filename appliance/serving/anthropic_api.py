"""Anthropic's Messages API: POST /v1/messages (plain and SSE streaming) and /v1/messages/count_tokens, on the
same port as the others, so the official `anthropic` client and the coding assistants built on it work.

Fields follow Anthropic's API: `max_tokens` is required, `system` stands beside `messages`, content is a
string or a list of blocks of which only text blocks are served (images, tools and documents are refused
with a 400). Sampling defaults are Anthropic's (temperature 1, in [0, 1]). Every request becomes a
Generation through `ServerState.generation()` and runs on the one scheduler. Errors come in Anthropic's
shape (errors.py picks it by path); the key may come as `x-api-key` (auth.py).
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
from models.engine import Generation
from models.sampling import SamplingParams


class Block(BaseModel):
    """A content block; only {"type": "text", "text": ...} is served (its cache_control, citations ignored)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = None


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


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Text] | None = None
    temperature: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)  # 0 keeps all
    stream: bool = False
    metadata: dict | None = None


router = APIRouter(prefix="/v1/messages", dependencies=[Depends(authorize)])
State = Annotated[ServerState, Depends(server_state)]


def _text(content: str | list[Block], where: str) -> str:
    """A turn's text: the string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    for block in content:
        if block.type != "text" or block.text is None:
            raise HTTPException(400, f"{where}: content blocks of type {block.type!r} are not supported; only text")
    return "".join(block.text or "" for block in content)


def _prompt_ids(state: ServerState, body: _Conversation) -> list[int]:
    """404 for a model not served, 400 for what this one cannot do; else the prompt in the model's chat template."""
    try:
        state.adapter_for(body.model)
    except LookupError:
        available = ", ".join(state.model_names())
        raise HTTPException(404, f"model: {body.model} not found; available: {available}") from None
    if body.tools:
        raise HTTPException(400, "tools are not supported")
    turns = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        turns.append({"role": m.role, "content": _text(m.content, f"messages.{i}.content")})
    return state.engine.chat_ids(turns)


def _stop_reason(gen: Generation) -> str:
    if gen.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if gen.stop_sequence is not None else "end_turn"


def _message(gen: Generation, id_: str, model: str, content: list[dict], done: bool) -> dict:
    """The message as Anthropic sends it: whole (done), or as message_start opens a stream."""
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(gen) if done else None,
        "stop_sequence": gen.stop_sequence if done else None,
        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens if done else 0},
    }


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


async def _events(stream: TokenStream, gen: Generation, id_: str, model: str) -> AsyncIterator[str]:
    """Anthropic's event sequence for one text block; a failure once the headers are gone is an error event."""
    try:
        yield _event("message_start", {"message": _message(gen, id_, model, [], done=False)})
        yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield _event("ping", {})
        try:
            async for piece in stream:
                yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        except GenerationError as e:
            yield _event("error", anthropic_error_body(str(e), 500))
            return
        yield _event("content_block_stop", {"index": 0})
        delta = {"stop_reason": _stop_reason(gen), "stop_sequence": gen.stop_sequence}
        yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": gen.completion_tokens}})
        yield _event("message_stop", {})
    finally:  # also when the client disconnects mid-stream
        stream.cancel()


@router.post("")
async def messages(request: Request, body: MessagesRequest, state: State):
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
    gen = state.generation(
        _prompt_ids(state, body), sampling, body.max_tokens, body.stop_sequences or [], model=body.model
    )
    stream = state.scheduler.stream(gen)  # admitted now: a full queue is a 429, not a broken stream
    id_ = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(_events(stream, gen, id_, body.model), media_type="text/event-stream")
    await unless_client_leaves(request, drain([stream]))
    return _message(gen, id_, body.model, [{"type": "text", "text": gen.text}], done=True)


@router.post("/count_tokens")
async def count_tokens(body: _Conversation, state: State) -> dict:
    return {"input_tokens": len(_prompt_ids(state, body))}
