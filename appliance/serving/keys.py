"""API keys: given by the owner, or made once and kept beside the model store, readable by the owner only."""

from __future__ import annotations

import secrets
import stat
from contextlib import suppress
from pathlib import Path

from models.files import write_atomic
from models.store import default_root


class KeyFileError(ValueError):
    """A key file the server must not start with: empty, or readable by others."""


def key_file(kind: str = "api") -> Path:
    return default_root().parent / f"{kind}-key"


def read_key(path: Path) -> str:
    """The key in `path`; refused if others may read the file or it holds no key."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{path} is open to others (mode {mode:04o}): make it owner-only with `chmod 600 {path}`"
            )
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the key file {path}: {e}") from e
    if not key:
        raise KeyFileError(f"{path} is empty: put a key in it, or delete it to have one made")
    return key


def server_keys(api_keys: list[str] | None, admin_key: str | None) -> tuple[frozenset[str], frozenset[str]]:
    """The inference and admin keys `appliance serve` accepts: those given, else the key files'."""
    given = [(k, "--api-key") for k in api_keys or []] + ([(admin_key, "--admin-key")] if admin_key is not None else [])
    for key, option in given:
        if not key.strip():  # an empty key would let an empty bearer token in
            raise KeyFileError(f"{option} is empty: give a key, or --no-auth to turn keys off")
    api = frozenset(k.strip() for k in api_keys) if api_keys else frozenset([load_or_create_key("api")])
    admin = frozenset([admin_key.strip() if admin_key is not None else load_or_create_key("admin")])
    return api, admin


def load_or_create_key(kind: str = "api") -> str:
    """The appliance's `api` (inference) or `admin` key; made on first start (0600, in a folder made 0700)."""
    path = key_file(kind)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = f"sk-appliance-{kind}-" + secrets.token_urlsafe(24)
        with suppress(FileExistsError):  # another server started at the same moment: its key stands
            write_atomic(path, (key + "\n").encode(), replace=False)
    return read_key(path)
