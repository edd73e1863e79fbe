"""API keys: given by the owner, or made once and kept beside the model store."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from models.store import default_root


def key_file() -> Path:
    return default_root().parent / "api-key"


def load_or_create_key() -> str:
    """The appliance's inference key; created (readable by the owner only) on first start."""
    path = key_file()
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-appliance-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
