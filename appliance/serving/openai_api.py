"""OpenAI-compatible REST: /v1/models, /v1/chat/completions, /v1/completions (plain and SSE streaming).

Request fields follow OpenAI's API, so the official `openai` client works unchanged. Sampling
defaults are OpenAI's (temperature 1, top_p 1); `seed` fixes the text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.serving.auth import authorize
from appliance.serving.disconnect import unless_client_leaves
from appliance.serving.errors import openai_error_body
from appliance.serving.fields import Message, Text
from appliance.serving.scheduler import GenerationError, TokenStream, drain
from appliance.serving.state import ServerState, server_state
from models.engine import Generation
from models.sampling import SamplingParams


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def response(self) -> JSONResponse:
        body = openai_error_body(str(self), self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Common(BaseModel):
    """OpenAI's fields, each bounded here, at the edge (numbers must be finite)."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0 keeps all
    repetition_penalty: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)  # vLLM's extension
    seed: int | None = None  # any integer: folded into [0, 2**64)
    stop: Text | list[Text] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: fixed-length output for benchmarks


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Text


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _generations(state: ServerState, body: _Common, prompt_ids: list[int]) -> list[Generation]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise OpenAIError(400, "stop takes up to 4 strings", param="stop")
    # choice i draws from seed + i, so n choices differ from each other yet repeat with the seed
    return [
        state.generation(
            prompt_ids,
            SamplingParams(
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                seed=None if body.seed is None else body.seed + i,
            ),
            body.max_completion_tokens or body.max_tokens,
            stop,
            body.ignore_eos,
        )
        for i in range(body.n)
    ]


def _usage(gens: list[Generation]) -> dict:
    prompt, completion = gens[0].prompt_tokens, sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _sse_chunks(
    streams: list[TokenStream], gens: list[Generation], envelope: dict, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """One SSE chunk per text piece of each choice, then finish chunks, usage and [DONE]."""

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**envelope, "choices": [choice]}

    try:
        try:
            for i, (stream, g) in enumerate(zip(streams, gens, strict=True)):
                if chat:
                    yield _sse(chunk(i, None, None, first=True))
                async for piece in stream:
                    yield _sse(chunk(i, piece, None))
                final = chunk(i, None, g.finish_reason)
                if i == len(gens) - 1:
                    final["usage"] = _usage(gens)
                yield _sse(final)
            if include_usage:
                yield _sse({**envelope, "choices": [], "usage": _usage(gens)})
        except GenerationError as e:  # the headers are gone: the failure travels as an error event
            yield _sse(openai_error_body(str(e), "server_error", code="generation_failed"))
        yield _sse("[DONE]")
    finally:  # also when the client disconnects mid-stream
        for stream in streams:
            stream.cancel()


router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
State = Annotated[ServerState, Depends(server_state)]


@router.get("/models")
async def list_models(state: State) -> dict:
    return {
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": state.started, "owned_by": "appliance"}],
    }


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise OpenAIError(
            404, f"model {name!r} does not exist; available: {state.model_name}", param="model", code="model_not_found"
        )


async def _respond(request: Request, state: ServerState, body: _Common, prompt_ids: list[int], chat: bool):
    gens = _generations(state, body, prompt_ids)
    streams = state.scheduler.streams(gens)  # admitted now, all or none: a full queue is a 429, not a broken stream
    kind = "chat.completion" if chat else "text_completion"
    envelope = {"id": _new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()), "model": state.model_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = _sse_chunks(streams, gens, {**envelope, "object": f"{kind}.chunk"}, chat, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    await unless_client_leaves(request, drain(streams))
    choices = [
        {
            "index": i,
            "finish_reason": g.finish_reason,
            "logprobs": None,
            **({"message": {"role": "assistant", "content": g.text}} if chat else {"text": g.text}),
        }
        for i, g in enumerate(gens)
    ]
    return {**envelope, "object": kind, "choices": choices, "usage": _usage(gens)}


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest, state: State):
    check_model(state, body.model)
    ids = state.engine.chat_ids([m.model_dump() for m in body.messages])
    return await _respond(request, state, body, ids, chat=True)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest, state: State):
    check_model(state, body.model)
    return await _respond(request, state, body, state.engine.prompt_ids(body.prompt), chat=False)
