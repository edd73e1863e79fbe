"""HTTPS and gRPC over TLS for the home-facing ports.

The server certificate is the appliance CA's (the CA that signs workers, so a device trusts one
certificate for everything: `appliance-ctl ca export`), for every name and address the appliance is
reached by, renewed before it expires; or the owner's own `--tls-cert/--tls-key`, re-read when the files
change. uvicorn and gRPC are handed one context each, and both are reloaded in place while serving.
With `--admin-mtls` the HTTPS port also asks for a client certificate from the CA (optional at the
handshake, so inference clients need none); `auth.py` then requires one for administration.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
from uvicorn.protocols.http.h11_impl import H11Protocol

from offload.pki import SERVER_NAME, CertificateAuthority

PEER_CERTIFICATE = "tls_peer_certificate"  # request.state's key: the client's verified certificate (DER) or None
RENEW_CHECK_S = 6 * 3600  # how often a running server looks at its certificate


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the port on this machine (plain HTTP is then the default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_names(host: str, extra: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a device may reach this appliance by: localhost, the host name and
    its mDNS name (`NAME.local`, what discovery announces), the fully qualified name, every address of
    every interface (or only `host`, when listening on one address), and the owner's `--tls-name`s."""
    import psutil

    hostname = socket.gethostname()
    dns = ["localhost", hostname, f"{hostname.split('.')[0]}.local"]
    fqdn = socket.getfqdn()
    if fqdn and fqdn != hostname and "." in fqdn:
        dns.append(fqdn)
    ips = ["127.0.0.1", "::1"]
    if host in ("0.0.0.0", "::", ""):
        for addresses in psutil.net_if_addrs().values():
            for a in addresses:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    ips.append(a.address.split("%")[0])  # a link-local address's %zone is not part of it
    elif not is_loopback(host):
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)  # a name to listen on is a name to be reached by
    for name in extra or []:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


class ServerTLS:
    """The server's certificate files, the contexts made from them, and their renewal.

    `issue`: for the CA's certificate, a callable that re-issues it when due (returns True when it
    did); None for the owner's files, which are re-read whenever they change."""

    def __init__(self, cert: Path, key: Path, issue: Callable[[], bool] | None = None, client_ca: bytes | None = None):
        self.cert, self.key, self._issue, self.client_ca = cert, key, issue, client_ca
        self._stamp = self._files_stamp()
        self._generation = 0
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._check_files()

    @classmethod
    def from_ca(cls, ca: CertificateAuthority, host: str, extra: list[str] | None, admin_mtls: bool) -> ServerTLS:
        dns, ips = local_names(host, extra)
        ca.server_identity(dns, ips)

        def issue() -> bool:
            return ca.server_identity(*local_names(host, extra))[1]

        cert, key = ca.folder / f"{SERVER_NAME}.pem", ca.folder / f"{SERVER_NAME}.key"
        return cls(cert, key, issue, ca.ca_pem if admin_mtls else None)

    def _files_stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in (self.cert, self.key))

    def _check_files(self) -> None:
        """A bad pair is refused at start-up with one line, not at the first handshake."""
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot use the TLS certificate {self.cert} with the key {self.key}: {e}") from e

    # -- HTTPS (uvicorn) ---------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """uvicorn's context (made once; `refresh` loads a new certificate into it in place)."""
        if self._context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:  # asked for, verified when given, not required (auth.py decides)
                context.verify_mode = ssl.CERT_OPTIONAL
                context.load_verify_locations(cadata=self.client_ca.decode())
            self._context = context
        return self._context

    def uvicorn_options(self) -> dict:
        """uvicorn.Config's TLS arguments: our context, and with client certificates the protocol that
        hands each request its client's certificate."""
        options: dict = {"ssl_context_factory": lambda config, default: self.ssl_context()}
        if self.client_ca is not None:
            options["http"] = PeerCertificateProtocol
        return options

    # -- gRPC ------------------------------------------------------------------------------
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials that take a renewed certificate at the next handshake (gRPC asks `fetch` each time)."""
        seen = [self._generation]

        def pair() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())])

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if seen[0] == self._generation:
                return None
            seen[0] = self._generation
            return pair()

        return grpc.dynamic_ssl_server_credentials(pair(), fetch)

    # -- renewal ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-issue the CA's certificate when due, or notice new owner files; load the new pair into both
        servers. True when it changed."""
        with self._lock:
            if self._issue is not None:
                self._issue()
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            self._check_files()
            if self._context is not None:
                self._context.load_cert_chain(self.cert, self.key)
            self._stamp = stamp
            self._generation += 1
            return True

    async def keep_fresh(self, every_s: float = RENEW_CHECK_S) -> None:
        """While serving: look at the certificate every `every_s` (a long-running appliance renews its own)."""
        while True:
            await asyncio.sleep(every_s)
            await asyncio.to_thread(self.refresh)


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, also handing each request of a TLS connection the client's verified
    certificate (DER, or None without one) in `request.state`. asyncio calls `connection_made` after the
    handshake, so the certificate is known by then."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERTIFICATE: der}
