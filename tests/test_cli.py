"""The commands as a user runs them: real processes, real output, clear errors with non-zero exits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The commands of the environment running the tests, whatever else is on PATH.
BIN = os.path.dirname(sys.executable)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=300, env={**os.environ, **path, **(env or {})}
    )


def test_generate_streams_the_answer(model_path):
    r = run("appliance", "generate", "The capital of France is", "-n", "12")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_runs_the_cpu_backend_on_the_threads_asked_for(model_path):
    from kernels import native

    if not native.available():
        pytest.skip(native.why_missing())
    for threads in ("1", "2"):
        r = run("appliance", "generate", "--backend", "cpu", "--threads", threads, "--stats", "-n", "2", "Hello")
        assert r.returncode == 0, r.stderr
        assert f"{threads} threads" in r.stderr
    r = run("appliance", "generate", "--threads", "0", "Hello")
    assert r.returncode != 0 and "--threads" in r.stderr


def test_generate_chat(model_path):
    r = run("appliance", "generate", "--chat", "Name the capital of France.", "--stats")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "finish: stop" in r.stderr and "backend: " in r.stderr


def test_generate_matches_the_library(served):
    r = run("appliance", "generate", "Once upon a time", "-n", "16", "-t", "0.8", "--seed", "5")
    from models.sampling import SamplingParams

    expected = served.generate(served.prompt_ids("Once upon a time"), SamplingParams(temperature=0.8, seed=5), 16).run()
    assert r.stdout == expected + "\n"


def test_generate_with_another_model_file(tmp_path, engine):
    from tests.gguf_factory import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf", engine.model.file.metadata)
    r = run("appliance", "generate", "--model", str(path), "hello", "-n", "5", "--stats")
    assert r.returncode == 0, r.stderr
    assert "generated tokens" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent.gguf"], "no model file at"),
        (["-n", "0"], "max_tokens must be a positive integer"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
    ],
)
def test_bad_input_is_a_clear_error(model_path, args, message):
    r = run("appliance", "generate", "hi", *args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello")
    r = run("appliance", "generate", "hi", "--model", str(p))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr


def test_ctl_models(model_path):
    r = run("appliance-ctl", "models", "verify")
    assert r.returncode == 0 and "verified" in r.stdout
    r = run("appliance-ctl", "models", "list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
    r = run("appliance-ctl", "models", "verify", "no-such-model")
    assert r.returncode == 5 and "unknown model" in r.stderr  # 5: an unknown name (appliance-ctl --help)


def test_ctl_verify_fails_on_an_empty_store(tmp_path):
    r = run("appliance-ctl", "models", "verify", env={"APPLIANCE_HOME": str(tmp_path)})
    assert r.returncode == 1 and "missing" in r.stderr


def test_bench_prints_its_table(model_path):
    """The figures themselves belong to `make bench`; here only that the command works end to end."""
    r = run(
        "appliance",
        "bench",
        "--backend",
        "numpy",
        "--threads",
        "1",
        "--no-peers",
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert "appliance, numpy" in r.stdout and "decode tok/s" in r.stdout and "decode bound" in r.stdout
