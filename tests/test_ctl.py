"""`appliance-ctl` as the owner runs it: a subprocess against a real `appliance serve`, `--json` parsed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kernels.backend import select_backend
from models.llama import Llama
from models.store import model_name
from offload.coordinator import layer_costs
from offload.planner import local_layers, parse_size
from tests.serving import ADMIN_KEY, running_server

BUDGET = "190MB"  # the appliance's, in the NumPy reference's float32 sizes: a few layers of SmolLM2


def planned_split(model_path) -> tuple[int, int]:
    """(layers the appliance keeps under BUDGET, the model's layer count), by the planner itself."""
    model = Llama.load(str(model_path), "numpy")
    return local_layers(layer_costs(model), model.fixed_nbytes, parse_size(BUDGET)), model.config.n_layers


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_path):
    """A fresh APPLIANCE_HOME for the server and the CLI, with the model store of the user's cache."""
    home = tmp_path_factory.mktemp("ctl") / "appliance"
    home.mkdir(mode=0o700)
    (home / "models").symlink_to(model_path.parent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(home))
        mp.delenv("APPLIANCE_SERVER", raising=False)
        mp.delenv("APPLIANCE_ADMIN_KEY", raising=False)
        yield home


@pytest.fixture(scope="module")
def server(home, model_path):
    with running_server("--model", str(model_path), "--no-advertise") as s:
        yield s


def ctl(*args: str, server=None, key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "appliance.ctl"]
    if server is not None:
        cmd += ["--server", server.url if hasattr(server, "url") else server]
    if key is not None:
        cmd += ["--admin-key", key]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=os.environ)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok_json(*args: str, server) -> object:
    result = ctl(*args, "--json", server=server)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _reprobes(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("appliance_offload_reprobes"))


def _upkeep_passes(server, n: int, timeout_s: float = 60) -> None:
    """Wait until the offload upkeep has re-probed the dropped workers n more times (its /metrics counter)."""
    target, deadline = _reprobes(server) + n, time.monotonic() + timeout_s
    while _reprobes(server) < target:
        assert time.monotonic() < deadline, f"the upkeep made no {n} passes in {timeout_s:.0f} s"
        time.sleep(0.1)


def test_status(server, model_path):
    status = ok_json("status", server=server)
    assert (
        status["model"] == model_name(model_path) == "smollm2-135m-instruct"
        and status["backend"] == select_backend().name
    )  # auto's choice
    assert status["layers"] == 30 and status["uptime_s"] >= 0 and status["active"] == 0
    assert isinstance(status["gpus"], list) and status["devices"] == []
    assert status["prefix_cache"]["max_bytes"] == 256 << 20  # serve's default --prefix-cache-mb
    people = ctl("status", server=server)
    assert people.returncode == 0 and f"model {model_name(model_path)} (30 layers)" in people.stdout
    assert "prefix cache: " in people.stdout


def test_bench(server):
    result = ok_json("bench", "--max-tokens", "3", server=server)
    assert result["completion_tokens"] == 3 and result["decode_tokens_per_s"] > 0 and result["ttft_ms"] > 0


def test_plan_all_local(server):
    plan = ok_json("plan", server=server)
    assert plan["stages"] == [{"device": "appliance", "address": None, "layers": [0, 30]}]


def test_models_list_load_unload(server, model_path):
    listing = ok_json("models", "list", server=server)
    assert listing["stored"][0]["state"] == "verified"
    assert {m["name"]: m["state"] for m in listing["served"]} == {
        model_name(model_path): "READY",  # the store's name (listing["stored"]'s) is the one served
        f"{model_name(model_path)}-logits": "READY",
    }
    assert listing["stored"][0]["name"] == model_name(model_path)
    logits = f"{model_name(model_path)}-logits"
    alias = f"{model_path.stem}-logits"  # another spelling of the name is taken too, and answered by the name
    assert ok_json("models", "unload", alias, server=server) == {"name": logits, "state": "UNAVAILABLE"}
    served = {m["name"]: m["state"] for m in ok_json("models", "list", server=server)["served"]}
    assert served[logits] == "UNAVAILABLE"
    assert ok_json("models", "load", logits, server=server)["state"] == "READY"
    # the local commands still work without a server
    assert ok_json("models", "verify", server="http://127.0.0.1:1")["name"] == "smollm2-135m-instruct"
    assert ok_json("models", "fetch", server="http://127.0.0.1:1")["path"].endswith(model_path.name)
    down = ctl("models", "list", "--json", server="http://127.0.0.1:1")
    assert down.returncode == 0 and json.loads(down.stdout)["served"] is None


def test_models_rm_refuses_the_served_model_and_unknown_names(server, model_path):
    served = ctl("models", "rm", "smollm2-135m-instruct", server=server)
    assert served.returncode == 1 and "is the model this appliance serves" in served.stderr
    assert model_path.is_file()
    unknown = ctl("models", "rm", "no-such-model", "--json", server=server)
    assert unknown.returncode == 5 and "unknown model 'no-such-model'" in unknown.stderr and unknown.stdout == ""


def test_models_rm_and_fetch_through_the_server(tmp_path, model_path, monkeypatch):
    """A server on another model: the stored SmolLM2 goes, then a second rm has nothing to remove."""
    from tests.gguf_factory import byte_vocab, write_tiny_llama

    home = tmp_path / "appliance"
    (home / "models").mkdir(parents=True)
    stored = home / "models" / model_path.name
    try:
        os.link(model_path, stored)  # a second name for the cached file: removing it leaves the cache alone
    except OSError:
        shutil.copyfile(model_path, stored)
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", byte_vocab())
    with running_server("--model", str(tiny), "--no-advertise", "--no-discover") as s:
        assert ok_json("models", "fetch", server=s)["path"] == str(stored)  # verified already: nothing to do
        assert ok_json("models", "rm", "smollm2-135m-instruct", server=s) == {
            "name": "smollm2-135m-instruct",
            "path": str(stored),
            "removed": True,
        }
        assert not stored.exists() and model_path.is_file()
        listing = ok_json("models", "list", server=s)
        assert listing["stored"][0]["state"] == "missing"
        again = ctl("models", "rm", "smollm2-135m-instruct", server=s)
        assert again.returncode == 5 and "not in the model store" in again.stderr
    down = ctl("models", "rm", "smollm2-135m-instruct", server="http://127.0.0.1:1")
    assert down.returncode == 3


def test_keys_made_used_and_revoked_without_a_restart(server, home):
    made = ok_json("keys", "create", "laptop", server=server)
    assert made["name"] == "laptop" and made["key"].startswith("sk-appliance-")
    stored = (home / "keys.json").read_text()
    assert made["key"] not in stored and oct((home / "keys.json").stat().st_mode & 0o777) == "0o600"
    assert [k["name"] for k in ok_json("keys", "list", server=server)] == ["laptop"]

    models = f"{server.url}/v1/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {made['key']}"}).status_code == 200
    taken = ctl("keys", "create", "laptop", server=server)
    assert taken.returncode == 1 and "exists already" in taken.stderr

    assert ok_json("keys", "revoke", "laptop", server=server) == {"name": "laptop", "revoked": True}
    assert httpx.get(models, headers={"Authorization": f"Bearer {made['key']}"}).status_code == 401
    assert ok_json("keys", "list", server=server) == []
    # a client key is not an admin key
    again = ok_json("keys", "create", "phone", server=server)
    assert ctl("status", server=server, key=again["key"]).returncode == 4


def test_devices_pair_list_and_unknown_names(server):
    code = ok_json("devices", "pair", "--ttl", "60", server=server)
    assert len(code["code"]) == 9 and code["ttl"] == 60
    assert ok_json("devices", "list", server=server) == []
    for verb in ("revoke", "drain"):
        unknown = ctl("devices", verb, "no-such-laptop", server=server)
        assert unknown.returncode == 5 and "no-such-laptop" in unknown.stderr
    bad_ttl = ctl("devices", "pair", "--ttl", "0", server=server)
    assert bad_ttl.returncode == 1 and "1 to 3600" in bad_ttl.stderr


def test_sessions_list_and_cancel(server, model_path):
    pieces: list[str] = []

    def stream() -> None:
        body = {"model": model_path.stem, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
        headers = {"Authorization": "Bearer test-key"}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=300) as r:
            lines = r.iter_lines()
            pieces.extend(line for line in lines if line.startswith("data: {"))

    client = threading.Thread(target=stream)
    client.start()
    deadline = time.monotonic() + 120
    while True:
        running = ok_json("sessions", server=server)
        if running and running[0]["completion_tokens"] >= 2:
            break
        assert time.monotonic() < deadline, "the generation never showed up in `sessions`"
        time.sleep(0.5)
    session = running[0]
    assert session["state"] == "active" and session["prompt_tokens"] > 0 and session["max_tokens"] == 400
    assert session["layers"] == ["appliance [0, 30)"]
    assert ok_json("sessions", "cancel", session["id"], server=server) == {"id": session["id"], "cancelled": True}
    client.join(timeout=60)
    assert not client.is_alive(), "the cancelled stream did not end"
    assert 2 <= len(pieces) < 400
    assert ok_json("sessions", server=server) == []
    gone = ctl("sessions", "cancel", session["id"], server=server)
    assert gone.returncode == 5 and "no running generation" in gone.stderr


def test_failures_are_one_line_and_an_exit_code(server, home):
    down = ctl("status", server="http://127.0.0.1:1")
    assert down.returncode == 3 and down.stderr.startswith("error: cannot reach the appliance at http://127.0.0.1:1")
    wrong = ctl("status", server=server, key="not-the-key")
    assert wrong.returncode == 4 and "refused the admin key" in wrong.stderr
    nokey = ctl("status", server=server, key=None)
    assert nokey.returncode == 4 and "no admin key" in nokey.stderr
    unknown_model = ctl("models", "unload", "no-such-model", server=server)
    assert unknown_model.returncode == 5 and "unknown model 'no-such-model'" in unknown_model.stderr
    unknown_key = ctl("keys", "revoke", "no-such-key", server=server)
    assert unknown_key.returncode == 5 and "no key is named 'no-such-key'" in unknown_key.stderr
    bad_name = ctl("keys", "create", "a b", server=server)
    assert bad_name.returncode == 1 and "key name" in bad_name.stderr
    usage = ctl("status", "--no-such-flag", server=server)
    assert usage.returncode == 2
    from_env = subprocess.run(
        [sys.executable, "-m", "appliance.ctl", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "APPLIANCE_SERVER": server.url, "APPLIANCE_ADMIN_KEY": ADMIN_KEY},
    )
    assert from_env.returncode == 0 and json.loads(from_env.stdout)["active"] == 0


def test_devices_and_plan_with_workers_drain_and_revoke(tmp_path, home, model_path, engine):
    """Two real workers hold the layers beyond 40 MB; draining one and revoking the other move or lose
    their layers, and requests keep their exact text while any worker is left."""
    from appliance.testbed.netsim import worker_process
    from offload.pki import certificate_authority, issue_identity

    ca = certificate_authority()
    for name in ("w1", "w2"):
        issue_identity(ca, tmp_path / name, name)
    prompt = "The capital of France is"
    expected = engine.generate(engine.prompt_ids(prompt), max_tokens=8).run()

    def complete(s) -> str:
        body = {"model": model_path.stem, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{s.url}/v1/completions", json=body, headers={"Authorization": "Bearer test-key"}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with (
        worker_process(tmp_path / "w1", budget="420MB") as w1,  # each can hold every offloaded layer
        worker_process(tmp_path / "w2", budget="420MB") as w2,
        running_server(
            "--model",
            str(model_path),
            "--memory-budget",
            BUDGET,
            "--backend",
            "numpy",
            "--worker",
            w1.address,
            "--worker",
            w2.address,
            "--no-discover",
            "--no-advertise",
            log_path=tmp_path / "server.log",
        ) as s,
    ):
        assert complete(s) == expected
        devices = {d["name"]: d for d in ok_json("devices", "list", server=s)}
        assert {d["state"] for d in devices.values()} == {"connected"}
        assert {d["address"] for d in devices.values()} == {w1.address, w2.address}
        holding = sorted((d for d in devices.values() if d["layers"]), key=lambda d: d["layers"])
        spans = [d["layers"] for d in holding]
        local, n = planned_split(model_path)
        assert (
            spans[0][0] == local
            and spans[-1][1] == n
            and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        )
        holder = holding[0]["name"]  # the one with the first offloaded layer (maybe all: each can hold them all)
        other = ({"w1", "w2"} - {holder}).pop()
        assert holding[0]["last_seen"] is not None and holding[0]["ms_per_layer"] > 0
        assert holding[0]["measured_ms_per_token"] > 0
        assert {d["weights"] for d in devices.values()} == {"own copy"}  # this machine's model store has the file

        plan = ok_json("plan", server=s)
        assert plan["stages"][0] == {**plan["stages"][0], "device": "appliance", "layers": [0, local]}
        assert plan["stages"][1]["device"] == holder and plan["stages"][-1]["layers"][1] == n
        assert plan["predicted_ms_per_token"] > 0 and plan["measured_ms_per_step"] > 0
        for d in plan["left_out"]:  # one hop fewer: the other one alone is predicted faster
            assert d["device"] == other and d["why"].startswith("out: with it "), d
        assert {d["name"] for d in ok_json("status", server=s)["devices"]} == {"w1", "w2"}

        assert ok_json("devices", "drain", holder, server=s)["drained"] == [devices[holder]["address"]]
        assert complete(s) == expected  # the other worker now holds every offloaded layer
        devices = {d["name"]: d for d in ok_json("devices", "list", server=s)}
        assert devices[holder]["state"] == "paired" and devices[other]["layers"] == [local, n]

        assert ok_json("devices", "revoke", other, server=s)["revoked_certificates"] == 1
        devices = {d["name"]: d["state"] for d in ok_json("devices", "list", server=s)}
        assert devices == {holder: "paired", other: "revoked"}
        nowhere = ctl("plan", server=s)
        assert nowhere.returncode == 1 and "no placement can hold the model" in nowhere.stderr


def test_devices_paired_by_ctl_then_one_revoked_mid_generation(tmp_path, model_path, monkeypatch):
    """Two laptops paired through `appliance-ctl devices pair` and `appliance-worker --pair`; the one holding
    the offloaded layers is revoked while streams run: no stream fails or changes its text, the revoked
    laptop is refused from then on, and its layers move to the other."""
    from appliance.testbed.netsim import free_port, worker_process
    from offload.client import WorkerClient
    from offload.errors import WorkerRefused
    from offload.pki import certificate_authority

    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    ports = {"laptop-a": free_port(), "laptop-b": free_port()}
    workers = [arg for port in ports.values() for arg in ("--worker", f"127.0.0.1:{port}")]
    prompt, key = "The capital of France is", {"Authorization": "Bearer test-key"}
    body = {"model": model_path.stem, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    with (
        running_server(
            *("--model", str(model_path), "--memory-budget", BUDGET, *workers),
            *("--backend", "numpy", "--no-discover", "--no-advertise"),
            log_path=tmp_path / "server.log",
        ) as s,
        contextlib.ExitStack() as laptops,
    ):
        for name, port in ports.items():  # the owner makes a code; the laptop pairs with it, then serves
            code = ok_json("devices", "pair", "--ttl", "60", server=s)["code"]
            paired = subprocess.run(
                [sys.executable, "-m", "offload.worker", "--pair", code, "--appliance", s.url, "--name", name]
                + ["--home", str(tmp_path / name), "--pair-only", "--no-advertise"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert paired.returncode == 0, paired.stderr
            laptops.enter_context(worker_process(tmp_path / name, budget="420MB", port=port))

        deadline = time.monotonic() + 120
        while True:  # the server's upkeep probe takes both in within seconds
            devices = {d["name"]: d for d in ok_json("devices", "list", server=s)}
            if all(devices.get(n, {}).get("state") == "connected" for n in ports):
                break
            assert time.monotonic() < deadline, f"the paired laptops never connected: {devices}"
            time.sleep(1)
        reply = httpx.post(f"{s.url}/v1/completions", json=body, headers=key, timeout=300)
        assert reply.status_code == 200, reply.text
        expected = reply.json()["choices"][0]["text"]
        holders = [d for d in ok_json("devices", "list", server=s) if d["layers"]]
        holder = holders[0]["name"]
        other = ({"laptop-a", "laptop-b"} - {holder}).pop()

        texts: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                text, events = "", []
                with httpx.stream(
                    "POST", f"{s.url}/v1/completions", json={**body, "stream": True}, headers=key, timeout=300
                ) as r:
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}")
                        continue
                    events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                for event in events:
                    if "error" in event:
                        failures.append(str(event["error"]))
                    else:
                        text += event["choices"][0]["text"]
                texts.append(text)

        clients = [threading.Thread(target=stream) for _ in range(2)]
        for c in clients:
            c.start()
        while len(texts) < 2 and not failures:
            time.sleep(0.1)
        revoked = ok_json("devices", "revoke", holder, server=s)
        done_before = len(texts)
        while len(texts) < done_before + 4 and not failures:
            time.sleep(0.1)
        stop.set()
        for c in clients:
            c.join(timeout=300)
        assert not failures, failures
        assert set(texts) == {expected}, "a stream's text changed when its layers moved"
        assert revoked == {"name": holder, "revoked_certificates": 1}

        devices = {d["name"]: d for d in ok_json("devices", "list", server=s)}
        assert devices[holder]["state"] == "revoked" and devices[other]["state"] == "connected"
        assert devices[other]["layers"] == list(planned_split(model_path))
        assert devices[other]["shipping"] is None  # shipped, done
        plan = ok_json("plan", server=s)
        assert [st["device"] for st in plan["stages"]] == ["appliance", other]
        _upkeep_passes(s, 2)  # past the upkeep's next probes: the revoked laptop is not taken back
        assert {d["name"]: d["state"] for d in ok_json("devices", "list", server=s)}[holder] == "revoked"
        ca = certificate_authority()
        with pytest.raises(WorkerRefused, match="revoked"):
            WorkerClient(f"127.0.0.1:{ports[holder]}", ca.identity(), ca.revoked_serials).verify()


def _on_a_terminal(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, str]:
    """Run cmd with stderr on a pseudo-terminal (stdout stays a pipe): its result, and what the terminal showed."""
    import pty

    master, slave = pty.openpty()
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, timeout=300, text=True)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return result, b"".join(shown).decode(errors="replace")


def test_progress_bars_only_for_a_person_at_a_terminal(tmp_path, model_path):
    """`models fetch` draws a bar on a terminal; with --json the terminal shows none and stdout is JSON."""
    from models.store import DEFAULT_MODEL

    site = tmp_path / "site" / DEFAULT_MODEL.member.split("/")[0]  # an installed copy to fetch from
    site.mkdir(parents=True)
    (site / DEFAULT_MODEL.filename).symlink_to(model_path)
    home = tmp_path / "appliance"
    env = {
        **os.environ,
        "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{tmp_path / 'site'}",
        "APPLIANCE_HOME": str(home),
        "TERM": "xterm-256color",
    }
    cmd = [sys.executable, "-m", "appliance.ctl", "models", "fetch", "--local"]
    person, terminal = _on_a_terminal(cmd, env)
    assert person.returncode == 0 and person.stdout.strip() == str(home / "models" / DEFAULT_MODEL.filename)
    assert "fetching smollm2-135m-instruct" in terminal and "MB" in terminal

    (home / "models" / DEFAULT_MODEL.filename).unlink()
    script, terminal = _on_a_terminal([*cmd, "--json"], env)
    assert script.returncode == 0 and json.loads(script.stdout)["name"] == "smollm2-135m-instruct"
    assert "fetching" not in terminal and "\x1b" not in script.stdout
