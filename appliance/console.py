"""Turning user-facing errors into a one-line message and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from rich.console import Console

from models.errors import ModelError
from offload.errors import WorkerRefused
from offload.pki import PairingError

F = TypeVar("F", bound=Callable)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def friendly_errors(fn: F) -> F:
    """Run a CLI command; a ModelError (or bad value) becomes `error: ...` and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ModelError, ValueError, PairingError, WorkerRefused) as e:
            stderr.print(f"[bold red]error:[/] {e}")
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
