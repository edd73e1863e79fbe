"""Revocation. The appliance reads its CA's list between tokens (`RevokedFile`) and tells each worker
which certificates it revoked; the worker refuses every call from them, so a revoked laptop cannot
reach the other devices either. The worker keeps the list in its home, so a restart does not forget it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from cryptography import x509

from offload.pki import APPLIANCE_NAME, certificate_name


class Revocations:
    """Serials the appliance has revoked, as it last said; only ever grows."""

    def __init__(self, path: Path):
        self.path = path
        self.serials: set[int] = {int(s) for s in json.loads(path.read_text())} if path.is_file() else set()
        self.lock = threading.Lock()

    def add(self, serials: Iterable[str]) -> None:
        with self.lock:
            if new := {int(s) for s in serials} - self.serials:
                self.serials |= new
                self.path.write_text(json.dumps(sorted(str(s) for s in self.serials)))

    def __contains__(self, serial: int) -> bool:
        return serial in self.serials


def caller_certificate(context: grpc.ServicerContext) -> x509.Certificate:
    """The client certificate mutual TLS already checked against our CA."""
    return x509.load_pem_x509_certificate(context.auth_context()["x509_pem_cert"][0])


def is_appliance(context: grpc.ServicerContext) -> bool:
    return certificate_name(caller_certificate(context)) == APPLIANCE_NAME  # never signed for a device


class RevocationCheck(grpc.ServerInterceptor):
    """Before any method runs: PERMISSION_DENIED for a certificate the appliance revoked."""

    def __init__(self, revocations: Revocations):
        self.revocations = revocations

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._checked(behavior)})
        return handler

    def _checked(self, behavior: Callable) -> Callable:
        def checked(request, context):
            cert = caller_certificate(context)
            if cert.serial_number in self.revocations:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"the certificate of {certificate_name(cert)!r} was revoked"
                )
            return behavior(request, context)

        return checked


class RevokedFile:
    """The appliance's side: the CA's revoked serials (`revoked.json`), read again only when the file
    changes, so asking before every token costs one stat."""

    def __init__(self, path: Path):
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.serials: frozenset[int] = frozenset()

    def __call__(self) -> frozenset[int]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return frozenset()
        if (st.st_mtime_ns, st.st_size) != self.stamp:
            self.serials = frozenset(int(s) for s in json.loads(self.path.read_text()))  # replaced atomically
            self.stamp = (st.st_mtime_ns, st.st_size)
        return self.serials
