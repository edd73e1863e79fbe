"""Crash safety: kill -9 at a random instant during a model fetch, pairing and key creation (24 trials).

Each child prints a line only after an operation has returned (what a user would have been told is
done). After every kill the state must load, be consistent, and hold everything confirmed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest

from appliance.serving.client_keys import ClientKeys
from models.store import DEFAULT_MODEL, ModelStore, verify
from offload.pki import certificate_authority

TRIALS = 8  # per kind: 24 in all
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


def test_kill_during_model_fetch(home, tmp_path, model_path):
    # an "installed copy" of the model's package for the store to copy from (no network in tests)
    site = tmp_path / "site" / DEFAULT_MODEL.member.split("/")[0]
    site.mkdir(parents=True)
    (site / DEFAULT_MODEL.filename).symlink_to(model_path)
    env = {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{tmp_path / 'site'}"}
    store = ModelStore()
    target = store.path_for(DEFAULT_MODEL)
    for _ in range(TRIALS):
        target.unlink(missing_ok=True)
        printed = killed_at_random([sys.executable, "-m", "appliance.ctl", "models", "fetch"], 0.3, 3.0, env)
        assert verify(target, DEFAULT_MODEL) in (None, "missing")  # never half a file under the real name
        if printed:  # the path was printed: the file is there, whole
            assert verify(target, DEFAULT_MODEL) is None
    done = subprocess.run([sys.executable, "-m", "appliance.ctl", "models", "fetch"], env=env, capture_output=True)
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
