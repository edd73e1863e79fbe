"""The Dockerfile: hadolint-clean, and in step with how CI and the README install the appliance.

(No Docker daemon in CI: the image is linted and cross-checked here, not built.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.cli import serve_command
from appliance.config import settings, tomllib
from appliance.worker_cli import worker_command

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(stage: str | None = None) -> list[str]:
    """The Dockerfile's instructions (continuation lines joined), of one stage or of all."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if stage is None:
        return lines
    start = next(i for i, line in enumerate(lines) if re.match(rf"FROM \S+ AS {stage}$", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM ")), len(lines))
    return lines[start:end]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_the_way_ci_and_the_readme_do():
    runs = [line for line in _instructions() if line.startswith("RUN ")]
    installs = [line for line in runs if "pip install" in line or re.search(r"\bmake [a-z]", line)]
    assert installs and all("make install" in line for line in installs), installs  # no pip of its own
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install: \$\(VENV\)/\.installed$", makefile, re.M)
    assert re.search(r"^install-test: \$\(VENV\)/\.installed-test$", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.installed-test: \$\(VENV\)/\.installed$", makefile, re.M)  # test = install + extra
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    # every package the project ships is copied into the image
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {line.split()[-1] for line in _instructions() if line.startswith("COPY ")}
    assert {p.rstrip("*") for p in shipped} <= copied


def test_targets_ports_user_volumes_and_health():
    appliance, worker = _instructions("appliance"), _instructions("worker")
    serve = settings("serve", serve_command(), {})
    assert f"EXPOSE {serve['http_port'].value} {serve['grpc_port'].value}" in appliance
    assert f"EXPOSE {settings('worker', worker_command(), {})['port'].value}" in worker
    assert any("/v2/health/ready" in line for line in appliance if line.startswith("HEALTHCHECK"))
    assert any(line.startswith("HEALTHCHECK") for line in worker)
    assert any(line.startswith("VOLUME") and "/var/lib/appliance/models" in line for line in appliance)
    base = _instructions("base")
    users = [line for line in base if line.startswith("USER ")]
    assert users and users[-1] != "USER root" and users[-1] != "USER 0"
    assert re.search(r"^ARG BASE=nvcr.io/nvidia/cuda:13\.", DOCKERFILE, re.M)  # CUDA 13 for DGX-class boxes
    assert "l4t-jetpack" in DOCKERFILE  # and how to build for Jetson
