"""Named client API keys the owner makes and revokes while the server runs (`appliance-ctl keys ...`).

They live in $APPLIANCE_HOME/keys.json as SHA-256 digests only (the key itself is shown once, when
made), written atomically, 0600, under an flock shared with every other process. The server's key
check reads the file again whenever it changes, so a revocation takes effect at the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.files import file_lock, write_atomic
from models.store import default_root

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyNameError(ValueError):
    """A key name that is malformed (400), taken (409) or unknown (404)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ClientKeys:
    def __init__(self, path: Path | None = None):
        self.path = path or default_root().parent / "keys.json"
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file last read
        self._digests: dict[str, str] = {}  # digest -> name

    # -- the key check -------------------------------------------------------------------------
    def match(self, token: str) -> str | None:
        """The name of the live key `token` is, if any (the file is re-read only when it has changed)."""
        if not token:
            return None
        self._refresh()
        wanted = digest(token)
        return next((name for d, name in self._digests.items() if hmac.compare_digest(d, wanted)), None)

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._digests = None, {}
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._digests = {entry["sha256"]: name for name, entry in self._read().items()}
            self._seen = seen

    # -- the owner's commands ------------------------------------------------------------------
    def list(self) -> list[dict]:
        return [{"name": name, "created": entry["created"]} for name, entry in sorted(self._read().items())]

    def create(self, name: str) -> str:
        """A new key named `name`; the only time the key itself is known (only its digest is kept)."""
        if not KEY_NAME.fullmatch(name):
            raise KeyNameError(f"a key name is 1 to 64 letters, digits, '.', '-' or '_'; got {name!r}", 400)
        key = "sk-appliance-" + secrets.token_urlsafe(24)
        with self._locked():
            keys = self._read()
            if name in keys:
                raise KeyNameError(f"a key named {name!r} exists already: revoke it first, or pick another name", 409)
            keys[name] = {"sha256": digest(key), "created": time.time()}
            self._write(keys)
        return key

    def revoke(self, name: str) -> None:
        with self._locked():
            keys = self._read()
            if name not in keys:
                raise KeyNameError(f"no key is named {name!r}; keys: {', '.join(sorted(keys)) or 'none'}", 404)
            del keys[name]
            self._write(keys)

    # -- the file ------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())["keys"]
        except FileNotFoundError:
            return {}

    def _write(self, keys: dict[str, dict]) -> None:
        write_atomic(self.path, json.dumps({"keys": keys}, indent=1).encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with file_lock(self.path.with_name("keys.lock")):
            yield
