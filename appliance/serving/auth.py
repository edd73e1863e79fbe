"""Who may call: inference takes an API (or admin) key, administration the admin key; both as bearer tokens
(inference also as Anthropic's `x-api-key` header, the way its clients send a key)."""

from __future__ import annotations

import hmac

from fastapi import Request

from appliance.serving.state import ServerState, server_state


class AuthError(Exception):
    """A missing or wrong API key (401)."""


def check_key(state: ServerState, authorization: str, admin: bool = False) -> None:
    """`authorization` is "Bearer KEY". A server started with --no-auth has no keys and takes everything;
    otherwise an empty token is never a key, whatever the key set holds."""
    if not (state.api_keys or state.admin_keys):
        return
    keys = state.admin_keys if admin else state.api_keys | state.admin_keys
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and not admin and state.client_keys is not None and state.client_keys.match(token):
        return  # a named key the owner made with `appliance-ctl keys create`, not revoked since
    if scheme.lower() != "bearer" or not token or not any(k and hmac.compare_digest(token, k) for k in keys):
        raise AuthError(f"a valid {'admin' if admin else 'API'} key is required: send 'Authorization: Bearer <key>'")


def authorize(request: Request) -> None:
    """The bearer token, or else the `x-api-key` header: the same keys, checked the same way."""
    authorization = request.headers.get("authorization")
    if authorization is None and "x-api-key" in request.headers:
        authorization = f"Bearer {request.headers['x-api-key']}"
    check_key(server_state(request), authorization or "")


def authorize_admin(request: Request) -> None:
    check_key(server_state(request), request.headers.get("authorization", ""), admin=True)
