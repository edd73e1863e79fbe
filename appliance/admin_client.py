"""`appliance-ctl`'s side of the admin API: one HTTP call, and every way it can fail as an exit code."""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"

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


class AdminClient:
    def __init__(self, server: str | None = None, key: str | None = None, timeout: float = 30.0):
        self.server = (server or os.environ.get("APPLIANCE_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.given_key, self.timeout = key, timeout

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """The JSON answer of /admin{path}; CtlError with the right exit code otherwise."""
        key = admin_key(self.given_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = f"{self.server}/admin{path}"
        try:
            reply = httpx.request(method, url, json=body, headers=headers, timeout=timeout or self.timeout)
        except httpx.TimeoutException as e:
            raise CtlError(f"the appliance at {self.server} did not answer in time ({e})", EXIT_SERVER_DOWN) from e
        except (httpx.TransportError, httpx.InvalidURL) as e:
            raise CtlError(
                f"cannot reach the appliance at {self.server} ({e}): is `appliance serve` running? "
                "(--server URL or APPLIANCE_SERVER picks another)",
                EXIT_SERVER_DOWN,
            ) from e
        if reply.status_code == 401:
            if key is None:
                raise CtlError(
                    f"no admin key: give --admin-key (or APPLIANCE_ADMIN_KEY), or run this where "
                    f"$APPLIANCE_HOME/admin-key is (the appliance at {self.server} wants one)",
                    EXIT_BAD_KEY,
                )
            raise CtlError(f"the appliance at {self.server} refused the admin key", EXIT_BAD_KEY)
        try:
            data = reply.json()
        except ValueError:
            data = None
        if reply.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            if isinstance(message, dict):
                message = message.get("message")
            message = message or f"HTTP {reply.status_code} from {url}"
            raise CtlError(str(message), EXIT_UNKNOWN if reply.status_code == 404 else EXIT_ERROR)
        if data is None:
            raise CtlError(f"{url} did not answer JSON: is {self.server} an appliance?", EXIT_SERVER_DOWN)
        return data
