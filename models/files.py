"""State files that survive a crash at any instant: atomic replacement, and a lock between processes.

Every piece of state the appliance keeps (the CA, certificates, paired devices, keys, revocations,
the model store) is written through `write_atomic`; read-modify-write cycles hold `file_lock`.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, replace: bool = True) -> None:
    """Write `path` so that a reader sees the old file or the new one, never half of one, and never a
    moment with looser permissions than `mode`. replace=False: an existing file wins (FileExistsError)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a new file) in `folder` survive a power cut."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (made 0600), against this and every other process; released on exit,
    and by the kernel if the process dies. Not reentrant: take it once per read-modify-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
