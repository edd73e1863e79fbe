"""The README's curl, openai and tritonclient examples, run as written against `appliance serve --tls`,
with the key and the CA it makes on first start. Only the ports differ: the server takes free ones (8000 and 8001 may be
held by something else on a test machine), and the examples' `localhost:8000` and `:8001` follow it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.testbed.launch import free_port, running

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@dataclass
class Served:
    env: dict[str, str]
    http_port: int
    grpc_port: int

    def example(self, text: str) -> str:
        """The README's example text, its default ports moved to this server's."""
        assert "localhost:8000" in text or "localhost:8001" in text, "the example names no default port"
        text = text.replace("localhost:8000", f"localhost:{self.http_port}")
        return text.replace("localhost:8001", f"localhost:{self.grpc_port}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_path):
    """A fresh HOME holding only the model: the server makes its keys there, as on a new box."""
    home = tmp_path_factory.mktemp("home")
    store = home / ".cache" / "appliance" / "models"
    store.mkdir(parents=True)
    shutil.copyfile(model_path, store / model_path.name)
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    ports = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    serve = [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1", "--tls", *ports]
    ca = home / ".cache" / "appliance" / "pki" / "ca.pem"  # made by the server, as on a new box
    with running(serve, f"https://127.0.0.1:{http_port}/health", env=env, cafile=ca):
        yield Served(env, http_port, grpc_port)


def test_curl_example(served):
    (curl,) = [b for b in blocks("sh") if "curl" in b]
    command = ["bash", "-c", served.example(curl)]
    r = subprocess.run(command, env=served.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"choices"' in r.stdout and '"content"' in r.stdout


@pytest.mark.parametrize("marker", ["import openai", "import ollama", "import anthropic", "tritonclient.grpc"])
def test_python_examples(served, marker):
    (code,) = [b for b in blocks("python") if marker in b]
    key = (Path(served.env["HOME"]) / ".cache" / "appliance" / "api-key").read_text().strip()
    program = f"KEY = {key!r}\n{served.example(code)}"
    r = subprocess.run([sys.executable, "-c", program], env=served.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_the_architecture_table_is_the_registry_s():
    """README's supported table is what the code's registry renders, so it cannot drift."""
    from kernels.backend import fused_features
    from models.arch import markdown_table

    lines = [line.strip() for line in markdown_table(fused_features()).splitlines() if line.strip()]
    readme = [line.strip() for line in README.read_text().splitlines()]
    assert all(line in readme for line in lines)
