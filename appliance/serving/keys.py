"""API keys: given by the owner, or made once and kept beside the model store."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from models.store import default_root


def key_file(kind: str = "api") -> Path:
    return default_root().parent / f"{kind}-key"


def load_or_create_key(kind: str = "api") -> str:
    """The appliance's `api` (inference) or `admin` key; created, owner-readable only, on first start."""
    path = key_file(kind)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"sk-appliance-{kind}-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
