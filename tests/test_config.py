"""One configuration story: config.toml < APPLIANCE_* < flags, for `serve` and `appliance-worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from appliance.cli import serve_command
from appliance.config import ConfigError, settings
from appliance.testbed.launch import free_port
from appliance.testbed.netsim import wait_listening
from appliance.worker_cli import worker_command
from tests.serving import running_server

WORKER = [sys.executable, "-c", "from appliance.worker_cli import main; main()"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    home = tmp_path / "appliance"
    home.mkdir()
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    for var in [v for v in os.environ if v.startswith("APPLIANCE_") and v not in ("APPLIANCE_HOME",)]:
        if var != "APPLIANCE_MDNS_INTERFACES":
            monkeypatch.delenv(var)
    return home


def write(home, text: str) -> None:
    (home / "config.toml").write_text(text)


def test_the_environment_beats_the_file_which_beats_the_default(home):
    write(home, '[serve]\nhttp_port = 8080\nmax_batch = 8\nworker = ["a:1"]\n[worker]\nmemory-budget = "1GB"\n')
    env = {"APPLIANCE_MAX_BATCH": "4", "APPLIANCE_WORKER": "b:2, c:3"}
    serve = settings("serve", serve_command(), env)
    assert (serve["http_port"].value, serve["http_port"].source) == (8080, "config.toml")
    assert (serve["max_batch"].value, serve["max_batch"].source) == (4, "APPLIANCE_MAX_BATCH")
    assert serve["worker"].value == ["b:2", "c:3"]
    assert (serve["grpc_port"].value, serve["grpc_port"].source) == (8001, "default")
    worker = settings("worker", worker_command(), {"APPLIANCE_WORKER_PORT": "6000"})
    assert worker["memory_budget"].value == "1GB" and worker["port"].value == 6000


def test_threads_is_a_setting_of_serve_and_the_worker(home):
    write(home, "[serve]\nthreads = 1\n[worker]\nthreads = 2\n")
    assert settings("serve", serve_command(), {})["threads"].value == 1
    assert settings("serve", serve_command(), {"APPLIANCE_THREADS": "3"})["threads"].value == 3
    assert settings("worker", worker_command(), {})["threads"].value == 2
    with pytest.raises(ConfigError, match="APPLIANCE_WORKER_THREADS"):
        settings("worker", worker_command(), {"APPLIANCE_WORKER_THREADS": "0"})


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[serve]\nhttp_prot = 1\n", {}, "[serve] has an unknown key 'http_prot'"),
        ("[serve]\nhttp_port = 'abc'\n", {}, "[serve] http_port: Input should be a valid integer"),
        ("[serve]\nworker = 'a:1'\n", {}, "[serve] worker: must be a list"),
        ("[servr]\n", {}, "unknown section(s) ['servr']"),
        ("[serve\n", {}, "is not valid TOML"),
        (
            "",
            {"APPLIANCE_MAX_QUEUE": "many"},
            "environment variable APPLIANCE_MAX_QUEUE: Input should be a valid integer",
        ),
    ],
)
def test_unknown_keys_and_bad_values_are_refused_naming_them(home, text, env, message):
    write(home, text)
    with pytest.raises(ConfigError) as e:
        settings("serve", serve_command(), env)
    assert message in str(e.value)


def test_serve_refuses_a_bad_config_at_start_up(home):
    write(home, "[serve]\nmax_batch = 'lots'\n")
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "config.toml [serve] max_batch: Input should be a valid integer" in r.stderr


def test_config_show_says_where_each_value_comes_from(home):
    write(home, '[serve]\nhttp_port = 8080\napi_key = ["secret-key"]\n')
    env = {**os.environ, "APPLIANCE_MAX_BATCH": "4"}
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "show", "--json"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["serve"]["http_port"] == {"value": 8080, "source": "config.toml"}
    assert shown["serve"]["max_batch"] == {"value": 4, "source": "APPLIANCE_MAX_BATCH"}
    assert shown["serve"]["api_key"]["value"] == "(secret)" and "secret-key" not in r.stdout
    assert shown["worker"]["port"] == {"value": 50051, "source": "default"}
    people = subprocess.run([sys.executable, "-m", "appliance.cli", "config", "show"], capture_output=True, text=True)
    assert "[serve]" in people.stdout and "config.toml" in people.stdout


def test_a_real_server_takes_file_env_and_flag_in_that_order(home, model_path, monkeypatch):
    unused = free_port()
    write(home, f'[serve]\nhttp_port = {unused}\nmax_tokens_limit = 100\nmax_batch = 2\nmodel = "{model_path}"\n')
    monkeypatch.setenv("APPLIANCE_MAX_TOKENS_LIMIT", "7")  # the environment beats the file's 100
    with running_server("--no-advertise") as server:  # its --http-port flag beats the file's port
        assert not server.url.endswith(f":{unused}")
        body = {"model": model_path.stem, "prompt": "Hi", "max_tokens": 8}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer test-key"})
        assert r.status_code == 400 and "at most 7" in r.json()["error"]["message"]


def test_the_worker_takes_its_port_from_the_file(home, tmp_path):
    port = free_port()
    write(home, f"[worker]\nport = {port}\nhost = '127.0.0.1'\nmemory_budget = '50MB'\nadvertise = false\n")
    bad = subprocess.run(
        WORKER, capture_output=True, text=True, timeout=60, env={**os.environ, "APPLIANCE_WORKER_IDLE_TIMEOUT": "x"}
    )
    assert bad.returncode == 1 and "APPLIANCE_WORKER_IDLE_TIMEOUT" in bad.stderr and "Traceback" not in bad.stderr
    from offload.pki import certificate_authority, issue_identity

    issue_identity(certificate_authority(), tmp_path / "w", "w")
    proc = subprocess.Popen([*WORKER, "--home", str(tmp_path / "w")], stderr=subprocess.PIPE, text=True)
    try:
        wait_listening("127.0.0.1", port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
