"""What every endpoint shares: the engine, its scheduler, the keys and the limits."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from appliance.scheduler import Scheduler
from models.engine import Engine


class AuthError(Exception):
    """A missing or wrong API key (401)."""


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    api_keys: frozenset[str] = frozenset()  # empty: no authentication (--no-auth)
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20
    started: int = field(default_factory=lambda: int(time.time()))


def server_state(request: Request) -> ServerState:
    return request.app.state.appliance


def authorize(request: Request) -> None:
    """Inference clients present `Authorization: Bearer KEY`."""
    keys = server_state(request).api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in keys):
        raise AuthError("a valid API key is required: send 'Authorization: Bearer <key>'")
