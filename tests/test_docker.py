"""The Dockerfile: hadolint-clean, in step with how CI and the README install the appliance, and with
`make image` / `make image-check` (appliance/testbed/image.py, image_check.py), which build and run it with
buildah: those take minutes and are their own make targets; here the files are checked against each other.
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


def _stages() -> dict[str, str]:
    """Each stage's name and what it is built FROM."""
    return {m[2]: m[1] for m in re.finditer(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, re.M)}


def test_the_image_installs_the_way_ci_and_the_readme_do():
    runs = [line for line in _instructions() if line.startswith("RUN ")]
    installs = [line for line in runs if "pip install" in line or re.search(r"\bmake [a-z]", line)]
    made = [re.search(r"\bmake (\w+)", line)[1] for line in installs if re.search(r"\bmake (\w+)", line)]
    assert made == ["deps", "install"] and len(installs) == 2, installs  # no pip of its own
    # the dependencies' layer comes before any code is copied: a code change does not reinstall them
    deps = _instructions("deps")
    copies = [line for line in deps if line.startswith("COPY ")]
    assert copies == ["COPY pyproject.toml Makefile ./"], copies
    assert any("make deps" in line and "EXTRAS=" in line for line in deps)
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
    for stage in (appliance, worker):
        users = [line for line in stage if line.startswith("USER ")]
        assert users and users[-1] != "USER root" and users[-1] != "USER 0"
    assert re.search(r"^ARG BASE=nvcr.io/nvidia/cuda:13\.", DOCKERFILE, re.M)  # CUDA 13 for DGX-class boxes
    assert "l4t-jetpack" in DOCKERFILE  # and how to build for Jetson


def test_run_time_images_have_no_compilers_and_carry_the_gpu_backend():
    stages = _stages()
    assert stages["appliance"] == stages["worker"] == "runtime" and stages["runtime"] == "${BASE}"
    runtime_apt = " ".join(line for line in _instructions("runtime") if "apt-get install" in line)
    assert "python3" in runtime_apt and not re.search(r"\b(gcc|g\+\+|make|python3-dev|libc6-dev)\b", runtime_apt)
    assert re.search(r"^ARG EXTRAS=cuda$", DOCKERFILE, re.M)  # pycuda, built in `deps`, copied with the venv
    for stage in ("appliance", "worker"):
        sources = [line.split()[1] for line in _instructions(stage) if line.startswith("COPY --from=")]
        assert {s.split("=")[1] for s in sources} <= {"deps", "build", "model"}, sources


def test_the_build_script_and_the_check_agree_with_the_dockerfile():
    from appliance.testbed import image, image_check

    stages = _stages()
    assert set(image.TARGETS) <= set(stages) and all(stages[t] == "runtime" for t in image.TARGETS)
    args = set(re.findall(r"^ARG (\w+)", DOCKERFILE, re.M))
    assert {"BASE", "EXTRAS"} <= args  # what image.build passes as --build-arg
    assert set(re.findall(r"--mount=type=secret,id=([\w-]+)", DOCKERFILE)) == {"pip-ca", "apt-conf"}
    script = Path(image.__file__).read_text()
    assert "id=pip-ca," in script and "id=apt-conf," in script
    health = next(line for line in _instructions("appliance") if line.startswith("HEALTHCHECK"))
    assert image_check.HTTP + "/v2/health/ready" in health
    assert f"EXPOSE {image_check.WORKER_PORT}" in _instructions("worker")
    # the check's serve and worker flags are options the commands take
    serve = {p for param in serve_command().params for p in param.opts + param.secondary_opts}
    worker = {p for param in worker_command().params for p in param.opts + param.secondary_opts}
    assert {f for f in image_check.SERVE_FLAGS if f.startswith("--")} <= serve
    assert {f for f in image_check.WORKER_FLAGS if f.startswith("--")} <= worker
    makefile = (ROOT / "Makefile").read_text()
    assert "-m appliance.testbed.image --arm64" in makefile and "-m appliance.testbed.image_check" in makefile


def test_make_deps_lists_the_dependencies_and_the_extras(tmp_path):
    """The line `make deps` writes its requirements with, run: pyproject's dependencies plus the cuda extra."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    plan = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "deps", f"VENV={venv}", "EXTRAS=cuda"], capture_output=True, text=True
    )
    line = next(line for line in plan.stdout.splitlines() if "deps.txt" in line and " -c " in line)
    subprocess.run(["bash", "-c", line], cwd=ROOT, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["cuda"]
    assert (venv / "deps.txt").read_text().splitlines() == wanted
    assert "libcuda.so.1" in plan.stdout and "CUDA_ROOT = " in plan.stdout  # pycuda's build: cuda.h and a link stub
