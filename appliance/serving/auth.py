"""Who may call: inference takes an API (or admin) key, administration the admin key; both as bearer tokens
(inference also as Anthropic's `x-api-key` header, the way its clients send a key). With `--admin-mtls`
administration also needs a client certificate from the appliance's CA, not revoked (tls.py verifies it
at the handshake and hands it on)."""

from __future__ import annotations

import hmac

from cryptography import x509
from fastapi import Request

from appliance.serving.state import ServerState, server_state
from appliance.serving.tls import PEER_CERTIFICATE


class AuthError(Exception):
    """A missing or wrong API key (401)."""


class CertificateRequired(Exception):
    """Administration without a valid client certificate under `--admin-mtls` (403, gRPC PERMISSION_DENIED)."""


def check_admin_certificate(state: ServerState, cert: x509.Certificate | None) -> None:
    """Under --admin-mtls, the caller's certificate (already verified against the CA by the TLS handshake)
    must be there and not revoked; without --admin-mtls, nothing to check."""
    if state.admin_ca is None:
        return
    if cert is None:
        raise CertificateRequired(
            "this appliance takes administration only over HTTPS from a device holding a certificate from its CA "
            "(--admin-mtls): `appliance-ctl ca issue NAME` on the appliance makes one; "
            "give it with appliance-ctl --cert FILE --key FILE"
        )
    if cert.serial_number in state.admin_ca.revoked_serials():
        raise CertificateRequired("this device's certificate was revoked: it may no longer administer the appliance")


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
    der = getattr(request.state, PEER_CERTIFICATE, None)
    check_admin_certificate(server_state(request), x509.load_der_x509_certificate(der) if der else None)
    check_key(server_state(request), request.headers.get("authorization", ""), admin=True)
