"""Crash safety: kill -9 at a random instant during a model fetch, pairing and key creation.

Two layers (sizes: tests/scale.py). The library (`TRIALS` per kind): a child script loops over the
operation and prints a line only after it has returned. The server (`SERVER_TRIALS` per kind): a real
`appliance serve` is driven through its admin and pairing APIs and killed -9 mid-operation, then
restarted on the same APPLIANCE_HOME. Either way, what a user was told is done is what counts: after
every kill the state must load, be consistent, and hold everything confirmed, as the restarted server
(and appliance-ctl against it) shows.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from appliance.serving.client_keys import ClientKeys
from appliance.testbed.launch import free_port, running
from models.store import DEFAULT_MODEL, ModelStore, verify
from offload.pairing import pair_with_appliance
from offload.pki import PairingError, certificate_authority
from tests.gguf_factory import byte_vocab, write_tiny_llama
from tests.scale import full_or
from tests.serving import ADMIN_KEY, serve_command

TRIALS = full_or(8, 4)  # per kind, killing the library's own loops: 24 in all in `make test-full`
# Per kind, through a real server: each trial starts one (4-8 s here), so the suite runs 2 per kind and
# `make crash` / `make test-full` 7 per kind (21 in all).
SERVER_TRIALS = full_or(7, 2)
FETCH = [sys.executable, "-m", "appliance.ctl", "models", "fetch", "--local"]
rng = random.Random(int(os.environ.get("CRASH_SEED", time.time())))

PAIRING_LOOP = """
import sys
from offload.pki import certificate_authority
from offload.pki import new_key, signing_request
ca = certificate_authority()
for i in range(1000):
    name = f"dev-{sys.argv[1]}-{i}"
    ca.pair(ca.new_code(60), signing_request(new_key(), name))
    print(name, flush=True)
"""

KEYS_LOOP = """
import sys
from appliance.serving.client_keys import ClientKeys
keys = ClientKeys()
for i in range(1000):
    name = f"k-{sys.argv[1]}-{i}"
    print(name, keys.create(name), flush=True)
"""


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    return tmp_path / "appliance"


def killed_at_random(cmd: list[str], low: float, high: float, env: dict | None = None) -> list[str]:
    """Run cmd, SIGKILL it after a random delay in [low, high) s (unless it ends first); its stdout lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        proc.wait(timeout=rng.uniform(low, high))
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.stdout.read().splitlines()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def package_env(tmp_path, model_path) -> dict:
    """The environment for a child with an "installed copy" of the model's package for the store to copy
    from (no network in tests)."""
    site = tmp_path / "site" / DEFAULT_MODEL.member.split("/")[0]
    site.mkdir(parents=True)
    (site / DEFAULT_MODEL.filename).symlink_to(model_path)
    return {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{tmp_path / 'site'}"}


def test_kill_during_model_fetch(home, package_env):
    env = package_env
    store = ModelStore()
    target = store.path_for(DEFAULT_MODEL)
    for _ in range(TRIALS):
        target.unlink(missing_ok=True)
        printed = killed_at_random(FETCH, 0.3, 3.0, env)
        assert verify(target, DEFAULT_MODEL) in (None, "missing")  # never half a file under the real name
        if printed:  # the path was printed: the file is there, whole
            assert verify(target, DEFAULT_MODEL) is None
    done = subprocess.run(FETCH, env=env, capture_output=True)
    assert done.returncode == 0 and verify(target, DEFAULT_MODEL) is None
    assert not list(store.root.glob(".fetch-*")), "a killed fetch's staging was not cleaned up"


def test_kill_during_pairing(home):
    confirmed: list[str] = []
    for trial in range(TRIALS):
        confirmed += killed_at_random([sys.executable, "-c", PAIRING_LOOP, str(trial)], 0.5, 3.0)
        ca = certificate_authority()  # loads: the CA key and certificate are whole
        issued = ca.workers()
        assert set(confirmed) <= set(issued), "a confirmed pairing was lost"
        codes = json.loads((certificate_authority().folder / "codes.json").read_text())["codes"]
        spent = sum(1 for c in codes.values() if c["used"])
        assert spent >= len(issued), "a device was recorded without its code being spent"
    assert len(confirmed) > 0, "no pairing finished in any trial: the kills came too early to test anything"
    assert mode(certificate_authority().folder) == 0o700 and mode(certificate_authority().folder / "ca.key") == 0o600
    for file in ("issued.json", "codes.json"):
        assert mode(certificate_authority().folder / file) == 0o600
    ca = certificate_authority()
    ca.pair(ca.new_code(60), _csr("after-the-crashes"))  # and it still works
    assert "after-the-crashes" in ca.workers()


def _csr(name: str) -> bytes:
    from offload.pki import new_key, signing_request

    return signing_request(new_key(), name)


def test_kill_during_key_creation(home):
    confirmed: dict[str, str] = {}
    for trial in range(TRIALS):
        for line in killed_at_random([sys.executable, "-c", KEYS_LOOP, str(trial)], 0.5, 3.0):
            name, key = line.split()
            confirmed[name] = key
        keys = ClientKeys()
        listed = {k["name"] for k in keys.list()}  # the file parses
        assert set(confirmed) <= listed, "a confirmed key was lost"
        for name, key in confirmed.items():
            assert keys.match(key) == name
    assert confirmed, "no key was made in any trial: the kills came too early to test anything"
    assert mode(home / "keys.json") == 0o600 and mode(home) == 0o700


# -- the server killed -9 mid-operation, then restarted on the same home --------------------------
@pytest.fixture()
def tiny_model(tmp_path) -> Path:
    """A model the server starts on in ~3 s (SmolLM2's vocabulary alone takes ~6 s to read)."""
    return write_tiny_llama(tmp_path / "tiny.gguf", byte_vocab())


@contextmanager
def appliance(model: Path, env: dict | None = None) -> Iterator[tuple[str, int]]:
    """`appliance serve` on free ports at $APPLIANCE_HOME: its URL and pid, once it answers."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serve_command(
        port, grpc_port, "test-key", ADMIN_KEY, "--model", str(model), "--no-advertise", "--no-discover"
    )
    with running(cmd, f"{url}/health", env=env) as pid:
        yield url, pid


def admin(method: str, url: str, path: str, body: dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reply = httpx.request(method, f"{url}/admin{path}", json=body, headers=headers, timeout=120)
    reply.raise_for_status()  # an error answer is a failure of the test, not the kill
    return reply.json()


def killed_during(pid: int, operation: Callable[[int], object], low: float, high: float, times: int | None = None):
    """Call operation(0), operation(1), ... (`times` of them, else until the server dies) on a thread, and
    kill -9 the server after a random delay in [low, high) s. The results of the calls that returned:
    what a client was told is done."""
    done: list = []
    failure: list[BaseException] = []

    def loop() -> None:
        for i in itertools.count() if times is None else range(times):
            try:
                done.append(operation(i))
            except (httpx.TransportError, PairingError) as e:
                refused = isinstance(e, PairingError) and isinstance(e.__cause__, urllib.error.HTTPError)
                if refused:
                    failure.append(e)
                return  # the server is gone (or going): this call was never confirmed
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                failure.append(e)
                return

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(rng.uniform(low, high))
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "a call to the killed server never returned"
    if failure:
        raise failure[0]
    return done


def ctl_json(url: str, *args: str) -> object:
    """appliance-ctl against the restarted server, as the owner would run it."""
    cmd = [sys.executable, "-m", "appliance.ctl", "--server", url, "--admin-key", ADMIN_KEY, *args, "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ask(url: str, last: bool, path: str, *ctl_args: str) -> object:
    """The admin API's answer: after the last restart through appliance-ctl --json, before it over plain
    HTTP (a ctl process costs 1-2 s here)."""
    return ctl_json(url, *ctl_args) if last else admin("GET", url, path)


def test_server_killed_during_key_creation(home, tiny_model):
    confirmed: dict[str, str] = {}

    def create(trial: int) -> Callable[[int], tuple[str, str]]:
        def one(i: int) -> tuple[str, str]:
            name = f"k-{trial}-{i}"
            return name, admin("POST", url, "/keys", {"name": name})["key"]

        return one

    for trial in range(SERVER_TRIALS + 1):
        with appliance(tiny_model) as (url, pid):
            listed = {k["name"] for k in ask(url, trial == SERVER_TRIALS, "/keys", "keys", "list")}
            assert set(confirmed) <= listed, f"confirmed keys lost: {set(confirmed) - listed}"
            for name, key in confirmed.items():  # each confirmed key still opens the API
                reply = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
                assert reply.status_code == 200, f"the confirmed key {name} is refused after a restart"
            if trial < SERVER_TRIALS:
                confirmed.update(killed_during(pid, create(trial), 0.05, 1.0))
    assert confirmed, "no key was made in any trial: the kills came too early to test anything"
    assert {k["name"] for k in ClientKeys().list()} >= set(confirmed)
    assert mode(home / "keys.json") == 0o600 and mode(home) == 0o700


def test_server_killed_during_pairing(home, tiny_model, tmp_path):
    confirmed: dict[str, int] = {}  # device -> the serial of the certificate it was given

    def pair(trial: int) -> Callable[[int], tuple[str, int]]:
        def one(i: int) -> tuple[str, int]:
            name = f"dev-{trial}-{i}"
            code = admin("POST", url, "/devices/pair", {"ttl": 60})["code"]
            identity = pair_with_appliance(code, url, name, tmp_path / name)
            return name, identity.certificate.serial_number

        return one

    for trial in range(SERVER_TRIALS + 1):
        with appliance(tiny_model) as (url, pid):
            devices = ask(url, trial == SERVER_TRIALS, "/devices", "devices", "list")
            listed = {d["name"]: d["state"] for d in devices}
            assert all(listed.get(name) == "paired" for name in confirmed), "a confirmed pairing was lost"
            ca = certificate_authority()  # loads: the CA key and certificate are whole
            issued = ca.workers()
            assert all(str(serial) in map(str, issued[name]["serials"]) for name, serial in confirmed.items())
            codes = json.loads((ca.folder / "codes.json").read_text())["codes"] if confirmed else {}
            assert sum(1 for c in codes.values() if c["used"]) >= len(issued), "a device paired on an unspent code"
            if trial < SERVER_TRIALS:
                confirmed.update(killed_during(pid, pair(trial), 0.05, 1.0))
    assert confirmed, "no pairing finished in any trial: the kills came too early to test anything"
    folder = certificate_authority().folder
    assert mode(folder) == 0o700 and all(mode(folder / f) == 0o600 for f in ("ca.key", "issued.json", "codes.json"))


def test_server_killed_during_model_fetch(home, tiny_model, package_env):
    target = ModelStore().path_for(DEFAULT_MODEL)
    name = DEFAULT_MODEL.name
    fetched: list[bool] = []  # per trial: whether the client was told the fetch was done
    whole = 1.0  # the time of a whole fetch, measured in the first trial

    def fetch(i: int) -> bool:
        return admin("POST", url, f"/models/{name}/fetch")["path"] == str(target)

    for trial in range(SERVER_TRIALS + 1):
        with appliance(tiny_model, package_env) as (url, pid):
            problem = verify(target, DEFAULT_MODEL)
            assert problem in (None, "missing"), f"half a model under the real name: {problem}"
            if fetched and fetched[-1]:  # confirmed last time: still there, whole
                assert problem is None
            if trial == 0:
                started = time.monotonic()
                fetch(0)
                whole = time.monotonic() - started
            if trial == SERVER_TRIALS:
                assert ctl_json(url, "models", "fetch", name)["path"] == str(target)  # fetching still works
                assert ctl_json(url, "models", "verify", name)["name"] == name
                assert not list(target.parent.glob(".fetch-*")), "a killed fetch's staging was never cleaned up"
                break
            if target.exists():
                assert admin("DELETE", url, f"/models/{name}")["removed"]
            # a random instant in this trial's slice of [0, 1.2 x a whole fetch]: early kills and late ones
            slice_s = 1.2 * whole / SERVER_TRIALS
            fetched.append(bool(killed_during(pid, fetch, trial * slice_s, (trial + 1) * slice_s, times=1)))
    print(f"a whole fetch: {whole:.2f} s; confirmed before the kill: {fetched}")
