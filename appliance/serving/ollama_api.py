"""Ollama's REST API under /api, on the same port as the others: the `ollama` client, Open WebUI, Continue and
phone apps work unchanged.

Field names follow Ollama's api/types.go, and so do its habits: responses stream as NDJSON unless a request
says `"stream": false`; options left out take Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9, no
token limit but the server's); durations are nanoseconds. Every request becomes a Generation through
`ServerState.generation()` and runs on the one scheduler. `keep_alive: 0` unloads the model once nothing runs
(its layers' weights and the prefix cache freed, /api/ps empty) and the next request loads it again; any other
keep_alive keeps it loaded for as long as the server runs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.serving.auth import authorize
from appliance.serving.disconnect import unless_client_leaves
from appliance.serving.errors import plain_error_body
from appliance.serving.fields import Message, Text
from appliance.serving.ollama_models import listed_all, running, shown, timestamp
from appliance.serving.scheduler import GenerationError, TokenStream, drain
from appliance.serving.state import ServerState, server_state
from appliance.serving.structured import any_json, function_tools, schema_grammar
from models.engine import Generation
from models.sampling import SamplingParams
from models.tools import CallParser, ToolCall, parse

# The Ollama release whose API (docs/api.md, api/types.go) this follows: clients compare it with the least
# Ollama version they need. Our own version is in /admin/status.
OLLAMA_VERSION = "0.32.15"


class _Body(BaseModel):
    """Read as Ollama (Go's JSON) reads a body: unknown fields are ignored, and a null is as if left out."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _without_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Options(_Body):
    """Ollama's `options`, with Ollama's defaults. Those below change the generation; the rest of Ollama's
    (num_keep, num_thread, num_gpu, min_p, typical_p, mirostat, ...) are accepted and ignored, as Ollama
    ignores names it does not know."""

    temperature: float = Field(default=0.8, ge=0, allow_inf_nan=False)
    top_k: int = Field(default=40, ge=0)  # 0 keeps all
    top_p: float = Field(default=0.9, gt=0, le=1, allow_inf_nan=False)
    repeat_penalty: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)  # over prompt and output
    seed: int = -1  # -1: a fresh draw each request
    num_predict: int = -1  # <= 0 (-1 no limit, -2 fill the context): up to the server's limit and the window
    stop: Text | list[Text] | None = None
    num_ctx: int | None = Field(default=None, ge=1)  # checked against the model's window, which is always whole


class _Request(_Body):
    """What /api/generate and /api/chat share."""

    model: Text
    stream: bool = True  # Ollama streams unless told not to
    options: Options | None = None
    keep_alive: float | str | None = None
    format: Any = None  # "json" (any JSON object) or a JSON schema: enforced by constrained decoding
    think: bool | str | None = None


class GenerateRequest(_Request):
    prompt: Text = ""
    system: Text = ""
    template: Text = ""
    suffix: Text = ""
    raw: bool = False
    context: list[int] | None = None  # token ids a previous answer returned (deprecated by Ollama, still sent)
    images: list[str] | None = None


class ChatMessage(Message):
    images: list[str] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict] | None = None


class ShowRequest(_Body):
    model: Text = ""
    name: Text = ""  # Ollama's older spelling of `model`
    verbose: bool = False  # also the long arrays of the metadata (the vocabulary, the merges)


class _JsonRoute(APIRoute):
    """Bodies are read as JSON whatever their Content-Type, as Ollama reads them (its documentation's
    `curl -d '{...}'` sends a form's type)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def as_json(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(Request(scope, request.receive))

        return as_json


router = APIRouter(prefix="/api", dependencies=[Depends(authorize)], route_class=_JsonRoute)
State = Annotated[ServerState, Depends(server_state)]


def _served(state: ServerState, name: str) -> None:
    """404 unless `name` is the served model (Ollama's names ignore case; ":latest" is the default tag)."""
    try:
        state.adapter_for(name)
    except LookupError:
        raise HTTPException(404, f"model '{name}' not found") from None


# --- requests to generations ---


def _grammar(state: ServerState, fmt: Any) -> str | None:
    """Ollama's `format`: "json" for any JSON object, or a JSON schema (an object)."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return any_json(state)
    if not isinstance(fmt, dict):
        raise HTTPException(400, 'format must be "json" or a JSON schema object')
    return schema_grammar(state, fmt)


def _generation(state: ServerState, body: _Request, prompt_ids: list[int]) -> Generation:
    options = body.options or Options()
    context = state.engine.model.config.context_length
    if options.num_ctx is not None and options.num_ctx > context:
        raise HTTPException(
            400, f"num_ctx is {options.num_ctx}; {state.model_name}'s context window is {context} tokens"
        )
    sampling = SamplingParams(
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        repetition_penalty=options.repeat_penalty,
        seed=None if options.seed == -1 else options.seed,
    )
    stop = [options.stop] if isinstance(options.stop, str) else list(options.stop or [])
    max_tokens = options.num_predict if options.num_predict > 0 else state.max_tokens_limit
    grammar = _grammar(state, body.format)
    return state.generation(
        prompt_ids, sampling, max_tokens, stop, max_tokens_field="num_predict", model=body.model, grammar=grammar
    )


def _check(state: ServerState, body: _Request, asks: dict[str, bool]) -> None:
    """404 for a model not served; 400 for what this one cannot do, in Ollama's words ("NAME does not support
    tools"); `asks` names each capability the request needs."""
    _served(state, body.model)
    for capability, asked in {"thinking": body.think not in (None, False), **asks}.items():
        if asked:
            raise HTTPException(400, f"{body.model} does not support {capability}")


_ZERO = re.compile(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?")


def _unloading(keep_alive: float | str | None) -> bool:
    """Whether keep_alive asks to unload now (0, "0", "0s", ...)."""
    if isinstance(keep_alive, str):
        return _ZERO.fullmatch(keep_alive.strip()) is not None
    return keep_alive == 0


def _no_work(state: ServerState, body: _Request, content: dict) -> dict:
    """Ollama's answer to a request with nothing to generate: the model "loaded" (or "unloaded")."""
    reason = "unload" if _unloading(body.keep_alive) else "load"
    if reason == "unload":
        state.scheduler.unload_when_idle()
    return {"model": body.model, "created_at": timestamp(), **content, "done": True, "done_reason": reason}


def _metrics(gen: Generation, stream: TokenStream, started: float) -> dict:
    """Ollama's counts and durations (ns): load = before the batch took the request (queue included),
    prompt_eval = until the first token, eval = the rest."""
    end = time.monotonic()
    admitted = stream.ticket.admitted_at or end
    first = stream.ticket.first_token_at or end

    def ns(seconds: float) -> int:
        return max(int(seconds * 1e9), 0)

    return {
        "total_duration": ns(end - started),
        "load_duration": ns(admitted - started),
        "prompt_eval_count": gen.prompt_tokens,
        "prompt_eval_duration": ns(first - admitted),
        "eval_count": gen.completion_tokens,
        "eval_duration": ns(end - first),
    }


def _line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


async def _answer(
    request: Request,
    state: ServerState,
    body: _Request,
    prompt_ids: list[int],
    started: float,
    content: Callable[[str], dict],
    final_extra: Callable[[Generation], dict] = lambda g: {},
    tools: bool = False,
):
    """Run one generation: NDJSON objects as the text grows then a final one with the figures, or (stream
    false) that final one alone with the whole text. `content` shapes text as the endpoint sends it. tools:
    the text may hold tool calls (tools were offered): they come back as the message's tool_calls, streamed
    in an object of their own once each is whole."""
    gen = _generation(state, body, prompt_ids)
    stream = state.scheduler.stream(gen)  # admitted now: a full queue is a 429, not a broken stream
    if _unloading(body.keep_alive):
        state.scheduler.unload_when_idle()  # once this one (and any other) is done

    def final(text: str) -> dict:
        return {
            "model": body.model,
            "created_at": timestamp(),
            **content(text),
            "done": True,
            "done_reason": gen.finish_reason,
            **final_extra(gen),
            **_metrics(gen, stream, started),
        }

    if not body.stream:
        await unless_client_leaves(request, drain([stream]))
        if not tools:
            return final(gen.text)
        text, calls = parse(gen.text, gen.engine.tool_format)
        return _with_calls(final(text), calls)

    def line(text: str, calls: list[ToolCall] = ()) -> str:
        return _line(
            _with_calls({"model": body.model, "created_at": timestamp(), **content(text), "done": False}, calls)
        )

    async def lines() -> AsyncIterator[str]:
        parser = CallParser(gen.engine.tool_format) if tools else None
        try:
            try:
                async for piece in stream:
                    if parser is None:
                        yield line(piece)
                        continue
                    called = len(parser.calls)
                    text = "".join(e.text for e in parser.feed(piece) if e.kind == "content")
                    if text:
                        yield line(text)
                    if parser.mode == "content" and len(parser.calls) > called:  # a call is whole
                        yield line("", parser.calls[called:])
                if parser is not None:
                    called = len(parser.calls)
                    text = "".join(e.text for e in parser.finish() if e.kind == "content")
                    if text or len(parser.calls) > called:
                        yield line(text, parser.calls[called:])
                yield _line(final(""))
            except GenerationError as e:  # the headers are gone: the failure is the last line
                yield _line(plain_error_body(str(e)))
        finally:  # also when the client disconnects mid-stream
            stream.cancel()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _with_calls(obj: dict, calls: list[ToolCall]) -> dict:
    """Ollama's tool_calls on a message: [{"function": {"name", "arguments": {...}}}]."""
    if calls:
        obj["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": _args(c)}} for c in calls]
    return obj


def _args(call: ToolCall) -> dict:
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _response(text: str) -> dict:
    return {"response": text}


def _message(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}}


# --- the endpoints ---


@router.api_route("/version", methods=["GET", "HEAD"])
async def version() -> dict:
    return {"version": OLLAMA_VERSION}


@router.api_route("/tags", methods=["GET", "HEAD"])
async def tags(state: State) -> dict:
    return {"models": await listed_all(state)}


@router.get("/ps")
async def ps(state: State) -> dict:
    return {"models": [await running(state)] if state.engine.resident else []}


@router.post("/show")
async def show(body: ShowRequest, state: State) -> dict:
    name = body.model or body.name
    if not name:
        raise HTTPException(400, "model is required")
    _served(state, name)
    return shown(state.engine, body.verbose)


def _context_ids(state: ServerState, context: list[int]) -> list[int]:
    vocab = state.engine.model.config.vocab_size
    if any(not 0 <= i < vocab for i in context):
        raise HTTPException(400, f"context holds token ids outside [0, {vocab})")
    return context


@router.post("/generate")
async def generate(request: Request, body: GenerateRequest, state: State):
    started = time.monotonic()
    _check(state, body, {"insert": bool(body.suffix), "vision": bool(body.images)})
    if body.raw and (body.template or body.system or body.context):
        raise HTTPException(400, "raw mode does not support template, system, or context")
    if body.template:
        raise HTTPException(
            400, "a request's own template is not supported: the model's chat template is used (or raw, unformatted)"
        )
    if not body.prompt:
        return _no_work(state, body, _response(""))
    engine = state.engine
    if body.raw:
        ids = engine.prompt_ids(body.prompt)
    else:
        turn = engine.prompt_ids(body.prompt, chat=True, system=body.system or None)
        ids = _context_ids(state, body.context or []) + turn

    def context(gen: Generation) -> dict:  # the conversation so far, to send back as the next `context`
        return {} if body.raw else {"context": gen.prompt_ids + gen.token_ids}

    return await _answer(request, state, body, ids, started, _response, context)


@router.post("/chat")
async def chat(request: Request, body: ChatRequest, state: State):
    started = time.monotonic()
    _check(state, body, {"vision": any(m.images for m in body.messages)})
    if not body.messages:
        return _no_work(state, body, _message(""))
    tools = function_tools(body.tools)
    ids = state.engine.chat_ids([m.turn() for m in body.messages], tools)
    return await _answer(request, state, body, ids, started, _message, tools=bool(tools))


SERVED = "/api/version, /api/tags, /api/show, /api/ps, /api/chat and /api/generate"
MANAGED = "this appliance serves one model, managed with `appliance-ctl models`"


def _not_served(path: str, why: str) -> Callable[[], Any]:
    async def refuse() -> None:
        raise HTTPException(501, f"/api{path} is not served: {why}; the Ollama API here serves {SERVED}")

    return refuse


for _path, _methods, _why in (
    ("/pull", ["POST"], MANAGED),
    ("/push", ["POST"], MANAGED),
    ("/create", ["POST"], MANAGED),
    ("/copy", ["POST"], MANAGED),
    ("/delete", ["DELETE"], MANAGED),
    ("/blobs/{digest}", ["HEAD", "POST"], MANAGED),
    ("/embed", ["POST"], "embeddings are not supported yet"),
    ("/embeddings", ["POST"], "embeddings are not supported yet"),
):
    router.add_api_route(_path, _not_served(_path, _why), methods=_methods, include_in_schema=False)
