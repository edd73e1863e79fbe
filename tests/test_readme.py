"""The README's curl, openai and tritonclient examples, run as written against `appliance serve` on
its default ports, with the key it makes on first start."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.bench.launch import running

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_path):
    """A fresh HOME holding only the model: the server makes its keys there, as on a new box."""
    if not (port_free(8000) and port_free(8001)):
        pytest.fail("ports 8000 and 8001 must be free for the README examples (something else holds them)")
    home = tmp_path_factory.mktemp("home")
    store = home / ".cache" / "appliance" / "models"
    store.mkdir(parents=True)
    shutil.copyfile(model_path, store / model_path.name)
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    with running(
        [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1"], "http://127.0.0.1:8000/health", env=env
    ):
        yield env


def test_curl_example(home):
    (curl,) = [b for b in blocks("sh") if "curl" in b]
    r = subprocess.run(["bash", "-c", curl], env=home, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"choices"' in r.stdout and '"content"' in r.stdout


@pytest.mark.parametrize("marker", ["import openai", "tritonclient.grpc"])
def test_python_examples(home, marker):
    (code,) = [b for b in blocks("python") if marker in b]
    key = (Path(home["HOME"]) / ".cache" / "appliance" / "api-key").read_text().strip()
    r = subprocess.run(
        [sys.executable, "-c", f"KEY = {key!r}\n{code}"], env=home, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
