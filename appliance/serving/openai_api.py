"""OpenAI-compatible REST: /v1/models, /v1/chat/completions, /v1/completions (plain and SSE streaming).

Request fields follow OpenAI's API, so the official `openai` client works unchanged. Sampling
defaults are OpenAI's (temperature 1, top_p 1); `seed` fixes the text. `logprobs` (chat: with
`top_logprobs`; completions: with `echo`, and `max_tokens: 0` to score a prompt only) are shaped in
openai_logprobs.py.
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
from appliance.serving.openai_logprobs import ChoiceLogprobs
from appliance.serving.scheduler import GenerationError, TokenStream, drain
from appliance.serving.state import ServerState, server_state
from appliance.serving.structured import choose, forced_grammar, function_tools, openai_format
from models.engine import Generation
from models.logprobs import MAX_TOP
from models.sampling import SamplingParams
from models.tools import CallParser, Event, ToolCall, parse


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
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo (completions): score the prompt
    max_completion_tokens: int | None = Field(default=None, ge=0)
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
    response_format: dict | None = None  # text, json_object or json_schema: enforced by constrained decoding

    def logprob_options(self) -> tuple[int | None, bool]:
        """(alternatives per token, or None for no logprobs; whether the prompt is echoed)."""
        return None, False


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # auto, none, required, or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None  # accepted; a required call is one call

    def choice(self) -> str | None:
        """tool_choice as structured.choose takes it: "auto", "none", "required" or a tool's name."""
        c = self.tool_choice
        if isinstance(c, dict):
            name = (c.get("function") or {}).get("name") if c.get("type") == "function" else None
            if not isinstance(name, str):
                raise OpenAIError(400, "tool_choice is {'type': 'function', 'function': {'name': ...}}", "tool_choice")
            return name
        if c not in (None, "auto", "none", "required"):
            raise OpenAIError(400, "tool_choice must be auto, none, required or a function", param="tool_choice")
        return c

    def logprob_options(self) -> tuple[int | None, bool]:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        return ((self.top_logprobs or 0) if self.logprobs else None), False


MAX_CHOICES = 64  # prompts x n in one request


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]  # OpenAI's four forms: text or token ids, one or many
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def logprob_options(self) -> tuple[int | None, bool]:
        return self.logprobs, self.echo


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _generations(state: ServerState, body: _Common, prompts: list[list[int]], grammar: str | None) -> list[Generation]:
    """n choices for each prompt, prompt by prompt (choice p * n + i is prompt p's i-th)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise OpenAIError(400, "stop takes up to 4 strings", param="stop")
    n_top, echo = body.logprob_options()
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    if max_tokens == 0 and not echo:
        raise OpenAIError(400, "max_tokens 0 needs echo (it scores the prompt only)", param="max_tokens")
    if len(prompts) * body.n > MAX_CHOICES:
        raise OpenAIError(400, f"at most {MAX_CHOICES} choices (prompts x n) in one request", param="prompt")
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
            max_tokens,
            stop,
            body.ignore_eos,
            logprobs=n_top,
            echo=echo,
            model=body.model,
            grammar=grammar,
        )
        for prompt_ids in prompts
        for i in range(body.n)
    ]


def _usage(gens: list[Generation], n: int) -> dict:
    """OpenAI's usage (each prompt counted once, not per choice); cached_tokens: the prompts' positions the
    prefix cache gave (not prefilled again)."""
    firsts = gens[::n]
    prompt, completion = sum(g.prompt_tokens for g in firsts), sum(g.completion_tokens for g in gens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in firsts)},
    }


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _finish_reason(gen: Generation, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and gen.finish_reason == "stop" else gen.finish_reason


def _call_delta(event: Event, calls: list[ToolCall]) -> dict:
    """OpenAI's tool_calls delta: the id, type and name first, then the arguments' text as it grows."""
    if event.kind == "call":
        call = calls[event.index]
        fn = {"name": call.name, "arguments": ""}
        return {"tool_calls": [{"index": event.index, "id": call.id, "type": "function", "function": fn}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


async def _sse_chunks(
    streams: list[TokenStream],
    gens: list[Generation],
    logprobs: list[ChoiceLogprobs],
    envelope: dict,
    chat: bool,
    include_usage: bool,
    echoes: list[str | None],
    n: int,
    tools: bool = False,
) -> AsyncIterator[str]:
    """One SSE chunk per text piece of each choice (after the echoed prompt, if any), each with the
    logprobs of the tokens it covers; with tools, the text's tool calls as tool_calls deltas; then finish
    chunks, usage and [DONE]."""

    def chunk(
        index: int,
        text: str | None,
        finish: str | None,
        lps: dict | None = None,
        first: bool = False,
        delta: dict | None = None,
    ) -> dict:
        if chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lps}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lps}
        return {**envelope, "choices": [choice]}

    try:
        try:
            for i, (stream, g, lp, echo) in enumerate(zip(streams, gens, logprobs, echoes, strict=True)):
                if chat:
                    yield _sse(chunk(i, None, None, first=True))
                echoed = echo is None
                parser = CallParser(g.engine.tool_format) if tools else None
                async for piece in stream:
                    if not echoed:  # the prompt's logprobs are known once the first token is
                        echoed = True
                        yield _sse(chunk(i, echo, None, lp.prompt()))
                    if parser is None:
                        yield _sse(chunk(i, piece, None, lp.next_piece()))
                        continue
                    lps = lp.next_piece()
                    for event in parser.feed(piece) or [None]:
                        if event is None and lps is None:  # held back (it may open a tool call), nothing to say
                            continue
                        delta = {} if event is None else _delta(event, parser.calls)
                        yield _sse(chunk(i, None, None, lps, delta=delta))
                        lps = None
                if parser is not None:
                    for event in parser.finish():
                        yield _sse(chunk(i, None, None, delta=_delta(event, parser.calls)))
                if not echoed:
                    yield _sse(chunk(i, echo, None, lp.prompt()))
                final = chunk(i, None, _finish_reason(g, parser.calls if parser else []), lp.rest())
                if i == len(gens) - 1:
                    final["usage"] = _usage(gens, n)
                yield _sse(final)
            if include_usage:
                yield _sse({**envelope, "choices": [], "usage": _usage(gens, n)})
        except GenerationError as e:  # the headers are gone: the failure travels as an error event
            yield _sse(openai_error_body(str(e), "server_error", code="generation_failed"))
        yield _sse("[DONE]")
    finally:  # also when the client disconnects mid-stream
        for stream in streams:
            stream.cancel()


def _delta(event: Event, calls: list[ToolCall]) -> dict:
    return {"content": event.text} if event.kind == "content" else _call_delta(event, calls)


router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
State = Annotated[ServerState, Depends(server_state)]


@router.get("/models")
async def list_models(state: State) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": state.started, "owned_by": "appliance"}
            for name in state.model_names()
        ],
    }


def check_model(state: ServerState, name: str) -> None:
    """404 unless `name` is served: the base model, or BASE+ADAPTER for a loaded adapter."""
    try:
        state.adapter_for(name)
    except LookupError:
        available = ", ".join(state.model_names())
        raise OpenAIError(
            404, f"model {name!r} does not exist; available: {available}", param="model", code="model_not_found"
        ) from None


async def _respond(
    request: Request,
    state: ServerState,
    body: _Common,
    prompts: list[list[int]],
    chat: bool,
    grammar: str | None = None,
    tools: bool = False,
    echoes: list[str] | None = None,
):
    """prompts: each prompt's ids (chat: one); tools: the text may hold tool calls (tools were offered): they come
    back as tool_calls; echoes: each prompt's text, to echo before its choices' text."""
    gens = _generations(state, body, prompts, grammar)
    streams = state.scheduler.streams(gens)  # admitted now, all or none: a full queue is a 429, not a broken stream
    kind = "chat.completion" if chat else "text_completion"
    model = state.served_name(body.model)
    envelope = {"id": _new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()), "model": model}
    logprobs = [ChoiceLogprobs(state.engine.tokenizer, g, chat) for g in gens]
    echoed = [e for e in (echoes or [None] * len(prompts)) for _ in range(body.n)]  # per choice
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        envelope = {**envelope, "object": f"{kind}.chunk"}
        chunks = _sse_chunks(streams, gens, logprobs, envelope, chat, include_usage, echoed, body.n, tools)
        return StreamingResponse(chunks, media_type="text/event-stream")
    await unless_client_leaves(request, drain(streams))
    choices = []
    for i, (g, lp, echo) in enumerate(zip(gens, logprobs, echoed, strict=True)):
        content, calls = parse(g.text, g.engine.tool_format) if tools else (g.text, [])
        choice = {"index": i, "finish_reason": _finish_reason(g, calls), "logprobs": lp.whole()}
        if chat:
            choice["message"] = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                choice["message"]["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ]
        else:
            choice["text"] = (echo or "") + g.text
        choices.append(choice)
    return {**envelope, "object": kind, "choices": choices, "usage": _usage(gens, body.n)}


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest, state: State):
    check_model(state, body.model)
    offered, forced = choose(function_tools(body.tools), body.choice())
    ids = state.engine.chat_ids([m.turn() for m in body.messages], offered)
    grammar = forced_grammar(state, forced) or openai_format(state, body.response_format)
    return await _respond(request, state, body, [ids], chat=True, grammar=grammar, tools=bool(offered))


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest, state: State):
    check_model(state, body.model)
    grammar = openai_format(state, body.response_format)
    prompts = _prompts(state, body.prompt)
    ids = [state.engine.prompt_ids(p) if isinstance(p, str) else p for p in prompts]
    echoes = [p if isinstance(p, str) else state.engine.tokenizer.decode(p) for p in prompts] if body.echo else None
    return await _respond(request, state, body, ids, chat=False, grammar=grammar, echoes=echoes)


def _listed(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts, each a text or token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _prompts(state: ServerState, prompt: str | list) -> list[str | list[int]]:
    prompts = _listed(prompt)
    vocab = state.engine.model.config.vocab_size
    if not prompts:
        raise OpenAIError(400, "prompt is an empty list", param="prompt")
    for p in prompts:
        if isinstance(p, list) and (not p or any(not 0 <= t < vocab for t in p)):
            raise OpenAIError(400, f"a prompt of token ids needs at least one, each in [0, {vocab})", param="prompt")
    return prompts
