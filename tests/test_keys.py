"""API and admin keys: an empty key or a key file others can read stops `appliance serve` at start-up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from appliance.serving.auth import AuthError, check_key
from appliance.serving.keys import KeyFileError, key_file, load_or_create_key, read_key, server_keys


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    return tmp_path / "appliance"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_made_by_the_server_is_owner_only(home):
    key = load_or_create_key("api")
    path = key_file("api")
    assert key.startswith("sk-appliance-api-") and path.read_text().strip() == key
    assert _mode(path) == 0o600 and _mode(home) == 0o700
    assert load_or_create_key("api") == key  # made once
    assert load_or_create_key("admin") != key


def test_servers_starting_together_agree_on_one_key(home):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key("api"), range(8)))
    assert len(keys) == 1
    assert [p.name for p in home.iterdir()] == ["api-key"]  # no temporary files left behind


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_key_file_is_refused(tmp_path, content):
    path = tmp_path / "api-key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{path} is empty"):
        read_key(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path, mode):
    path = tmp_path / "admin-key"
    path.write_text("sk-secret\n")
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        read_key(path)
    path.chmod(0o600)
    assert read_key(path) == "sk-secret"


def test_empty_keys_on_the_command_line_are_refused(home):
    with pytest.raises(KeyFileError, match="--api-key is empty"):
        server_keys(["good", " "], "admin")
    with pytest.raises(KeyFileError, match="--admin-key is empty"):
        server_keys(["good"], "")
    assert server_keys([" good "], " admin ") == (frozenset({"good"}), frozenset({"admin"}))


def test_an_empty_bearer_token_is_never_a_key():
    """Even were an empty key to reach the server's key set, an empty token does not match it."""
    # check_key reads only the key sets: a state without an engine stands in for the server's
    state = SimpleNamespace(api_keys=frozenset({"", "k"}), admin_keys=frozenset({"admin"}), client_keys=None)
    for header in ("", "Bearer", "Bearer ", "Bearer    ", "Basic k", "Bearer wrong"):
        with pytest.raises(AuthError):
            check_key(state, header)
    check_key(state, "Bearer k")
    check_key(state, "bearer admin")
    with pytest.raises(AuthError, match="admin key"):
        check_key(state, "Bearer k", admin=True)


def _serve(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--no-advertise", "--no-discover", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("content", "mode", "args", "message"),
    [
        (None, None, ["--api-key", ""], "--api-key is empty"),
        (None, None, ["--api-key", "k", "--admin-key", " "], "--admin-key is empty"),
        ("\n", 0o600, [], "api-key is empty"),
        ("sk-key\n", 0o644, [], "chmod 600"),
    ],
)
def test_appliance_serve_refuses_bad_keys_at_start_up(tmp_path, content, mode, args, message):
    if content is not None:
        tmp_path.joinpath("api-key").write_text(content)
        tmp_path.joinpath("api-key").chmod(mode)
    result = _serve(*args, home=tmp_path)
    assert result.returncode == 1
    assert "error:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
