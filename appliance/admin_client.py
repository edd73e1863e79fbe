"""`appliance-ctl`'s side of the admin API: one HTTP call, and every way it can fail as an exit code."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SERVER = "https://127.0.0.1:8000"  # `appliance serve` listens beyond loopback, so over TLS

# Exit codes, as `appliance-ctl --help` and the README document them.
EXIT_ERROR = 1  # a bad value, a refused request, a damaged model file
EXIT_USAGE = 2  # the command line itself (typer's own code)
EXIT_SERVER_DOWN = 3  # nothing answers at --server
EXIT_BAD_KEY = 4  # no admin key, or the server refused it
EXIT_UNKNOWN = 5  # no such model, device, session or key
EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 error (bad value, refused request); 2 usage; 3 server down; "
    "4 admin key missing or refused; 5 unknown name (model, device, session, key)."
)


class CtlError(Exception):
    """What to print after `error:`, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def admin_key(given: str | None) -> str | None:
    """--admin-key (or APPLIANCE_ADMIN_KEY), else the key file `appliance serve` made here, if any."""
    if given:
        return given
    from appliance.serving.keys import KeyFileError, key_file, read_key

    path = key_file("admin")
    if not path.exists():
        return None  # ask anyway: a server down says so, a server with keys answers 401
    try:
        return read_key(path)
    except KeyFileError as e:
        raise CtlError(str(e), EXIT_BAD_KEY) from e


def _home() -> Path:
    from models.store import default_root

    return default_root().parent


def tls_context(cacert: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Whom appliance-ctl trusts, and the certificate it shows (for --admin-mtls).

    Trust: --cacert alone; else the system's CAs plus the appliance's CA where one is found
    ($APPLIANCE_HOME/pki/ca.pem on the appliance, $APPLIANCE_HOME/ca.pem where `ca export` was copied).
    Certificate: --cert/--key; else $APPLIANCE_HOME/admin.{pem,key} (`appliance-ctl ca issue`); else, on
    the appliance itself, its own certificate from its CA."""
    home = _home()
    if cacert is not None:
        if not cacert.is_file():
            raise CtlError(f"--cacert {cacert}: no such file")
        context = ssl.create_default_context(cafile=str(cacert))
    else:
        context = ssl.create_default_context()
        for found in (home / "pki" / "ca.pem", home / "ca.pem"):
            if found.is_file():
                context.load_verify_locations(cafile=str(found))
    if (cert is None) != (key is None):
        raise CtlError("--cert and --key go together: give both")
    if cert is None and (home / "admin.pem").is_file() and (home / "admin.key").is_file():
        cert, key = home / "admin.pem", home / "admin.key"
    if cert is None and (home / "pki" / "ca.key").is_file():
        from offload.pki import APPLIANCE_NAME, certificate_authority

        certificate_authority().identity()  # the appliance's own, made once
        cert, key = home / "pki" / f"{APPLIANCE_NAME}.pem", home / "pki" / f"{APPLIANCE_NAME}.key"
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise CtlError(f"cannot use the client certificate {cert} with the key {key}: {e}") from e
    return context


class AdminClient:
    def __init__(
        self,
        server: str | None = None,
        key: str | None = None,
        timeout: float = 30.0,
        cacert: Path | None = None,
        cert: Path | None = None,
        cert_key: Path | None = None,
    ):
        self.server = (server or os.environ.get("APPLIANCE_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.given_key, self.timeout = key, timeout
        self.tls = (cacert, cert, cert_key)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """The JSON answer of /admin{path}; CtlError with the right exit code otherwise."""
        key = admin_key(self.given_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = f"{self.server}/admin{path}"
        verify = tls_context(*self.tls) if self.server.startswith("https:") else True
        try:
            reply = httpx.request(
                method, url, json=body, headers=headers, timeout=timeout or self.timeout, verify=verify
            )
        except httpx.ConnectError as e:
            raise CtlError(_connect_failure(self.server, e), EXIT_SERVER_DOWN) from e
        except httpx.RemoteProtocolError as e:
            raise CtlError(
                f"the appliance at {self.server} closed the connection ({e}): if it serves HTTPS "
                "(the default beyond loopback), use --server https://...",
                EXIT_SERVER_DOWN,
            ) from e
        except httpx.TimeoutException as e:
            raise CtlError(f"the appliance at {self.server} did not answer in time ({e})", EXIT_SERVER_DOWN) from e
        except (httpx.TransportError, httpx.InvalidURL) as e:
            raise CtlError(_connect_failure(self.server, e), EXIT_SERVER_DOWN) from e
        data = _json(reply)
        if reply.status_code == 403 and _code(data) == "client_certificate_required":
            raise CtlError(str(data["error"]["message"]), EXIT_BAD_KEY)
        if reply.status_code == 401:
            if key is None:
                raise CtlError(
                    f"no admin key: give --admin-key (or APPLIANCE_ADMIN_KEY), or run this where "
                    f"$APPLIANCE_HOME/admin-key is (the appliance at {self.server} wants one)",
                    EXIT_BAD_KEY,
                )
            raise CtlError(f"the appliance at {self.server} refused the admin key", EXIT_BAD_KEY)
        if reply.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            if isinstance(message, dict):
                message = message.get("message")
            message = message or f"HTTP {reply.status_code} from {url}"
            raise CtlError(str(message), EXIT_UNKNOWN if reply.status_code == 404 else EXIT_ERROR)
        if data is None:
            raise CtlError(f"{url} did not answer JSON: is {self.server} an appliance?", EXIT_SERVER_DOWN)
        return data


def _json(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return None


def _code(data: Any) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _connect_failure(server: str, e: Exception) -> str:
    """Why a connection failed, in the owner's terms: nothing there, plain HTTP, or a certificate not trusted."""
    text = str(e)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"the appliance at {server} answers plain HTTP, not HTTPS: use --server http://..."
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"the appliance at {server} shows a certificate this machine does not trust ({e}): give its CA with "
            "--cacert FILE (on the appliance: appliance-ctl ca export > appliance-ca.pem), or put it in "
            "$APPLIANCE_HOME/ca.pem"
        )
    return (
        f"cannot reach the appliance at {server} ({e}): is `appliance serve` running? "
        "(--server URL or APPLIANCE_SERVER picks another)"
    )
