"""The HTTP server: one FastAPI app, errors in each protocol's own shape, a body-size limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.serving import openai_api, pairing
from appliance.serving.auth import AuthError
from appliance.serving.kserve import http as kserve_http
from appliance.serving.kserve.repository import KServeError, Repository
from appliance.serving.openai_api import OpenAIError
from appliance.serving.scheduler import QueueFullError
from appliance.serving.state import ServerState
from models.errors import ContextLengthError, ModelError


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(self.limit, send)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    await JSONResponse(
        _error_body("/v1", f"request body over the limit of {limit} bytes", "request_too_large"), status_code=413
    )({"type": "http"}, None, send)


def _error_body(path: str, message: str, code: str | None = None) -> dict:
    """OpenAI clients expect {"error": {...}}; KServe clients expect {"error": "..."}."""
    if path.startswith("/v1"):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"error": message}


def _reply_path(path: str, status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(path, message, code), status_code=status)


def _reply(request: Request, status: int, message: str, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(_error_body(request.url.path, message, code), status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="appliance",
        version="0.1.0",
        description="OpenAI-compatible REST and KServe v2 (Triton) for the home's language models.",
    )
    app.state.appliance = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    app.state.kserve = Repository(state)
    app.include_router(openai_api.router)
    app.include_router(pairing.router)
    for router in (kserve_http.health, kserve_http.router, kserve_http.admin):
        app.include_router(router)

    metrics = state.scheduler.metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        path = request.url.path
        protocol = "openai" if path.startswith("/v1/") else "kserve" if path.startswith("/v2/") else None
        response = await call_next(request)
        if protocol:
            metrics.requests.labels(protocol).inc()
            if response.status_code >= 400:
                metrics.errors.labels(protocol, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": state.model_name,
            "active": len(state.scheduler.active),
            "waiting": len(state.scheduler.waiting),
        }

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

    @app.exception_handler(QueueFullError)
    async def busy(request: Request, e: QueueFullError):
        return _reply(request, 429, str(e), "server_busy", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ModelError)
    async def bad_input(request: Request, e: ModelError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return _reply(request, 400, str(e), code)

    return app
