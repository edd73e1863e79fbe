"""Each protocol's error shape, written once: OpenAI's on /v1 (and outside the others), Anthropic's on
/v1/messages, `{"error": "..."}` on /v2 (KServe/Triton) and /api (Ollama), which share it.

gRPC's statuses are mapped in kserve/grpc.py (`status_of`).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

KSERVE_PREFIX = "/v2"
OLLAMA_PREFIX = "/api"
ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error type for each status its clients map to an exception class; others are "api_error"
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def printable(message: str) -> str:
    """A message safe to encode as UTF-8 JSON (a lone surrogate from a request becomes an escape)."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def openai_error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": printable(message), "type": type_, "param": param, "code": code}}


def plain_error_body(message: str) -> dict:
    """KServe v2 / Triton's shape, and Ollama's: {"error": "..."}."""
    return {"error": printable(message)}


def anthropic_error_body(message: str, status: int) -> dict:
    """Anthropic's shape: {"type": "error", "error": {"type", "message"}}, its type read from the status."""
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": printable(message)}}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def error_response(
    path: str, status: int, message: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """An error for a request to `path`, in the shape its protocol's clients parse."""
    if _under(path, KSERVE_PREFIX) or _under(path, OLLAMA_PREFIX):
        body = plain_error_body(message)
    elif _under(path, ANTHROPIC_PREFIX):
        body = anthropic_error_body(message, status)
    else:
        body = openai_error_body(message, "server_error" if status >= 500 else "invalid_request_error", code=code)
    return JSONResponse(body, status_code=status, headers=headers)
