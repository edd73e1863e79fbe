"""The HTTP server: one FastAPI app, errors in each protocol's own shape, a body-size limit."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__
from appliance.serving import admin, anthropic_api, dashboard, embeddings, ollama_api, openai_api, pairing
from appliance.serving.auth import AuthError, CertificateRequired
from appliance.serving.disconnect import ClientLeft
from appliance.serving.errors import error_response
from appliance.serving.kserve import http as kserve_http
from appliance.serving.kserve.repository import KServeError, Repository
from appliance.serving.openai_api import OpenAIError
from appliance.serving.scheduler import GenerationError, QueueFullError
from appliance.serving.state import ServerState
from models.errors import ContextLengthError, ModelError

log = logging.getLogger("appliance")
# the metrics' label, by path (the first prefix that matches)
PROTOCOLS = (("/v1/messages", "anthropic"), ("/v1/", "openai"), ("/v2/", "kserve"), ("/api/", "ollama"))


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare a length.

    A chunked body is counted as it is read; once over, whatever the app would answer (it sees a
    broken body) is replaced by the 413 in the path's protocol shape."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(scope["path"], 413, f"request body over the limit of {self.limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen, over, answered = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered
            if over:  # the app's own answer to the cut-off body is dropped for the 413
                if not answered:
                    answered = True
                    await too_large(scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            if not answered:
                await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


def _reply(request: Request, status: int, message: str, code: str | None = None, headers=None) -> JSONResponse:
    return error_response(request.url.path, status, message, code, headers)


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="appliance",
        version=__version__,
        description="OpenAI-compatible REST, Anthropic's Messages API, Ollama's API and KServe v2 (Triton) for the "
        "home's language models.",
    )
    app.state.appliance = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    app.state.kserve = Repository(state)
    app.include_router(openai_api.router)
    app.include_router(embeddings.router)
    app.include_router(ollama_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(pairing.router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    for router in (kserve_http.health, kserve_http.router, kserve_http.admin):
        app.include_router(router)

    metrics = state.scheduler.metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        path = request.url.path
        protocol = next((name for prefix, name in PROTOCOLS if path.startswith(prefix)), None)
        try:
            response = await call_next(request)
        except Exception as e:  # a bug: still an answer in the protocol's shape, and the traceback in the log
            log.exception("unhandled error on %s", path)
            response = error_response(path, 500, f"internal error: {type(e).__name__}")
        if protocol:
            metrics.requests.labels(protocol).inc()
            if response.status_code >= 400:
                metrics.errors.labels(protocol, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine can serve; 503 when it cannot (the scheduler stopped, or its steps keep failing)."""
        ready = state.scheduler.ready
        body = {
            "status": "ok" if ready else "unavailable",
            "model": state.model_name,
            "active": len(state.scheduler.active),
            "waiting": len(state.scheduler.waiting),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _reply(request, 400, _describe(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _reply(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(KServeError)
    async def kserve_error(request: Request, e: KServeError):
        return _reply(request, e.status, str(e))

    @app.exception_handler(AuthError)
    async def unauthorized(request: Request, e: AuthError):
        return _reply(request, 401, str(e), "invalid_api_key")

    @app.exception_handler(CertificateRequired)
    async def no_certificate(request: Request, e: CertificateRequired):
        return _reply(request, 403, str(e), "client_certificate_required")

    @app.exception_handler(QueueFullError)
    async def busy(request: Request, e: QueueFullError):
        return _reply(request, 429, str(e), "server_busy", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ModelError)
    async def bad_input(request: Request, e: ModelError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return _reply(request, 400, str(e), code)

    @app.exception_handler(ClientLeft)
    async def gone(request: Request, e: ClientLeft):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the metrics count it

    @app.exception_handler(GenerationError)
    async def failed(request: Request, e: GenerationError):
        return _reply(request, 500, str(e), "generation_failed")

    return app
