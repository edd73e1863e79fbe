"""`appliance-ctl`: the owner's admin CLI.

Most commands ask the running appliance over its admin API (`--server`, the admin key); `models
fetch|verify` and `workers ...` work on this machine's files, without a server. Tables for people,
`--json` for scripts; failures are one `error: ...` line and a documented exit code.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.admin_client import DEFAULT_SERVER, EXIT_CODES_HELP, EXIT_SERVER_DOWN, AdminClient, CtlError
from appliance.console import friendly_errors, stderr
from models.errors import ModelStoreError
from models.store import KNOWN_MODELS, ModelStore, verify

app = typer.Typer(
    help=f"Administer the appliance. {EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
models_app = typer.Typer(help="The model store here, and the models the server serves.", no_args_is_help=True)
app.add_typer(models_app, name="models")
devices_app = typer.Typer(help="LAN devices, as the running appliance sees them.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
workers_app = typer.Typer(
    help="Paired LAN devices, from this machine's files (no server needed).", no_args_is_help=True
)
app.add_typer(workers_app, name="workers")
sessions_app = typer.Typer(help="Generations running now.")
app.add_typer(sessions_app, name="sessions")
keys_app = typer.Typer(help="Named client API keys (revocable without a restart).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
ca_app = typer.Typer(help="The appliance's certificate authority, from this machine's files.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
ledger_app = typer.Typer(help="Each device's compute for the home, signed (local files).", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
adapters_app = typer.Typer(help="LoRA adapters served beside the model (MODEL+ADAPTER).", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

NameArg = Annotated[str, typer.Argument(help="Model name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
F = TypeVar("F", bound=Callable)
_client = AdminClient()
out = Console(highlight=False)


@app.callback()
def _options(
    server: Annotated[
        str, typer.Option(envvar="APPLIANCE_SERVER", help="The appliance's URL.", show_default=True)
    ] = DEFAULT_SERVER,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="APPLIANCE_ADMIN_KEY", help="The admin key (default: the file $APPLIANCE_HOME/admin-key)."),
    ] = None,
    cacert: Annotated[
        Path | None,
        typer.Option(
            envvar="APPLIANCE_CACERT",
            help="The CA to trust for https:// (default: the system's, plus $APPLIANCE_HOME/pki/ca.pem or "
            "$APPLIANCE_HOME/ca.pem).",
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            envvar="APPLIANCE_CLIENT_CERT",
            help="Client certificate for --admin-mtls (default: $APPLIANCE_HOME/admin.pem, or the appliance's own).",
        ),
    ] = None,
    key: Annotated[Path | None, typer.Option(envvar="APPLIANCE_CLIENT_KEY", help="The key of --cert.")] = None,
) -> None:
    global _client
    _client = AdminClient(server, admin_key, cacert=cacert, cert=cert, cert_key=key)


def command(fn: F) -> F:
    """A command: ModelError and bad values exit 1 (friendly_errors), CtlError its own code; no tracebacks."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CtlError as e:
            stderr.print(f"[bold red]error:[/] {e}")
            sys.exit(e.code)

    return friendly_errors(wrapper)  # type: ignore[return-value]


def show(data: Any, as_json: bool, table: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        table(data)


def _table(title: str | None, rows: list[dict], columns: list[str], empty: str = "none") -> None:
    if not rows:
        out.print(f"{title}: {empty}" if title else empty)
        return
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(_cell(row.get(col)) for col in columns))
    out.print(t)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"[{value[0]}, {value[1]})"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


BYTES_COLUMNS = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())


def _show_progress(as_json: bool) -> bool:
    """Progress goes to stderr, only for a person at a terminal: never with --json, never into a pipe or a log."""
    return not as_json and stderr.is_terminal


@contextmanager
def progress_bar(description: str, total: int, as_json: bool) -> Iterator[Callable[[int], None]]:
    """A bar of `total` bytes; yields the callback to advance it by n bytes (a no-op when none is shown)."""
    if not _show_progress(as_json):
        yield lambda n: None
        return
    with Progress(*BYTES_COLUMNS, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def spinner(description: str, as_json: bool) -> Iterator[None]:
    """For work on the server whose size we do not see: a spinner with the time spent."""
    if not _show_progress(as_json):
        yield
        return
    with Progress(SpinnerColumn(), TextColumn(description), TimeElapsedColumn(), console=stderr, transient=True) as p:
        p.add_task(description, total=None)
        yield


def _ago(t: float | None) -> str | None:
    return None if not t else f"{max(time.time() - t, 0):.1f} s ago"


# -- status and bench ---------------------------------------------------------------------------
@app.command()
@command
def status(as_json: JsonOpt = False) -> None:
    """The running appliance: version, model, backend, load, speed, devices and GPUs."""

    def table(s: dict) -> None:
        out.print(
            f"appliance {s['version']} at {_client.server}: up {dt.timedelta(seconds=int(s['uptime_s']))}\n"
            f"model {s['model']} ({s['layers']} layers), backend {s['backend']} ({s['instruction_set']})\n"
            f"requests: {s['active']} running, {s['waiting']} waiting; {s['tokens_per_s']:.1f} tokens/s now, "
            f"{s['tokens_total']} generated since start"
        )
        pc = s.get("prefix_cache")
        out.print(
            "prefix cache: off"
            if not pc
            else f"prefix cache: {pc['hits']} hits, {pc['misses']} misses, {pc['tokens_reused']} tokens reused; "
            f"{pc['entries']} entries, {pc['bytes'] / 2**20:.1f} / {pc['max_bytes'] / 2**20:.0f} MiB"
        )
        gpus = [
            {
                **g,
                "memory": f"{g['memory_used_bytes'] / 2**30:.1f} / {g['memory_total_bytes'] / 2**30:.1f} GiB",
            }
            for g in s["gpus"]
        ]
        _table("GPUs", gpus, ["name", "utilization_percent", "memory", "temperature_c", "power_w"], "none (CPU)")
        _table("devices", s["devices"], ["name", "state", "address", "layers"])

    show(_client.call("GET", "/status"), as_json, table)


@app.command()
@command
def bench(
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate (2 to 512).")] = 32,
    prompt: Annotated[str, typer.Option(help="The prompt.")] = "The capital of France is",
    as_json: JsonOpt = False,
) -> None:
    """A quick tokens/s figure from the server: one greedy generation beside whatever else runs."""
    result = _client.call("POST", "/bench", {"prompt": prompt, "max_tokens": max_tokens}, timeout=600)

    def table(r: dict) -> None:
        rate = r["decode_tokens_per_s"]
        out.print(
            f"{r['completion_tokens']} tokens after a {r['prompt_tokens']}-token prompt in {r['seconds']:.2f} s: "
            f"first token {r['ttft_ms']:.0f} ms, decode {'-' if rate is None else f'{rate:.1f}'} tokens/s"
        )

    show(result, as_json, table)


@app.command()
@command
def plan(as_json: JsonOpt = False) -> None:
    """Where each layer runs now, with the predicted and measured ms per token."""

    def table(p: dict) -> None:
        cols = ["device", "address", "layers", "bytes", "ms_per_layer", "one_way_ms", "measured_ms_per_token", "why"]
        _table(f"placement of {p['layers']} layers", p["stages"], cols)
        for d in p.get("left_out", []):
            out.print(f"{d['device']} ({d['address']}) left out: {d['why']}")
        predicted, measured = p["predicted_ms_per_token"], p["measured_ms_per_step"]
        out.print(
            f"predicted: {'-' if predicted is None else f'{predicted:.2f}'} ms per token; "
            f"measured: {'-' if measured is None else f'{measured:.2f}'} ms per model step"
        )

    show(_client.call("GET", "/plan"), as_json, table)


# -- models ------------------------------------------------------------------------------------
def _spec(name: str):
    if name not in KNOWN_MODELS:
        raise CtlError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}", 5)
    return KNOWN_MODELS[name]


@models_app.command("list")
@command
def list_models(
    as_json: JsonOpt = False,
    local: Annotated[bool, typer.Option("--local", help="Only the store here; do not ask the server.")] = False,
) -> None:
    """Known models in the store here (whether the copy verifies), and what the server serves."""
    store = ModelStore()
    stored = [
        {
            "name": name,
            "file": spec.filename,
            "size_bytes": spec.size,
            "state": verify(store.path_for(spec), spec) or "verified",
        }
        for name, spec in KNOWN_MODELS.items()
    ]
    served = None
    if not local:
        try:
            served = _client.call("GET", "/models")
        except CtlError as e:
            stderr.print(f"[yellow]served models unknown: {e}[/]")
    data = {"store": str(store.root), "stored": stored, "served": served}

    def table(d: dict) -> None:
        _table(f"model store: {d['store']}", d["stored"], ["name", "file", "size_bytes", "state"])
        if d["served"] is not None:
            _table(f"served by {_client.server}", d["served"], ["name", "version", "state", "reason"])

    show(data, as_json, table)


LocalOpt = Annotated[bool, typer.Option("--local", help="The store on this machine; do not ask the server.")]


@models_app.command()
@command
def fetch(name: NameArg = "smollm2-135m-instruct", as_json: JsonOpt = False, local: LocalOpt = False) -> None:
    """Store a model on the appliance (no-op if a verified copy is there); print its path.
    Fetched here when the server cannot be reached (or with --local)."""
    spec = _spec(name)
    result = None
    if not local:
        try:
            with spinner(f"fetching {name} on the appliance", as_json):
                result = _client.call("POST", f"/models/{name}/fetch", timeout=900)
        except CtlError as e:
            if e.code != EXIT_SERVER_DOWN:
                raise
            stderr.print(f"[yellow]{e}; fetching into the store here[/]")
    if result is None:
        with progress_bar(f"fetching {name}", spec.size, as_json) as advance:
            result = {"name": name, "path": str(ModelStore().get(spec, advance))}
    show(result, as_json, lambda d: print(d["path"]))


@models_app.command("rm")
@command
def remove(name: NameArg, as_json: JsonOpt = False) -> None:
    """Delete a stored model from the appliance (refused for the model it is serving)."""
    _spec(name)
    result = _client.call("DELETE", f"/models/{name}")
    show(result, as_json, lambda d: print(f"removed {d['path']}"))


@models_app.command("verify")
@command
def verify_model(name: NameArg = "smollm2-135m-instruct", as_json: JsonOpt = False) -> None:
    """Check the stored copy's size and SHA-256; exit 1 if it is missing or damaged."""
    store = ModelStore()
    spec = _spec(name)
    problem = verify(store.path_for(spec), spec)
    if problem:
        raise ModelStoreError(f"{name} at {store.path_for(spec)}: {problem}")
    show({"name": name, "sha256": spec.sha256}, as_json, lambda d: print(f"{name}: verified ({d['sha256']})"))


@models_app.command()
@command
def load(name: Annotated[str, typer.Argument(help="A served model's name.")], as_json: JsonOpt = False) -> None:
    """Make a served model available again (KServe repository load)."""
    with spinner(f"loading {name}", as_json):
        result = _client.call("POST", f"/models/{name}/load", timeout=600)
    show(result, as_json, lambda d: print(f"{d['name']}: {d['state']}"))


@models_app.command()
@command
def unload(name: Annotated[str, typer.Argument(help="A served model's name.")], as_json: JsonOpt = False) -> None:
    """Take a served model out of service: its requests are refused until `load` (KServe repository unload)."""
    show(_client.call("POST", f"/models/{name}/unload"), as_json, lambda d: print(f"{d['name']}: {d['state']}"))


# -- devices (through the server) ----------------------------------------------------------------
DeviceArg = Annotated[str, typer.Argument(help="The device's name, as `devices list` shows it.")]


@devices_app.command("list")
@command
def list_devices(as_json: JsonOpt = False) -> None:
    """Paired devices; connected ones with their layers, speed, link and last reply."""

    def table(rows: list[dict]) -> None:
        rows = [{**r, "last_seen": _ago(r.get("last_seen"))} for r in rows]
        cols = ["name", "state", "address", "layers", "weights", "ms_per_layer", "one_way_ms", "mb_per_s", "last_seen"]
        _table("devices", rows, cols, "none paired (appliance-ctl devices pair)")

    show(_follow_shipping(as_json), as_json, table)


def _follow_shipping(as_json: bool) -> list[dict]:
    """The devices; first, while weights ship to some of them, a bar per device (only for a person at a
    terminal: --json answers at once, with each device's `shipping` bytes)."""
    rows = _client.call("GET", "/devices")
    if not _show_progress(as_json) or not any(r.get("shipping") for r in rows):
        return rows
    with Progress(*BYTES_COLUMNS, console=stderr, transient=True) as bars:
        tasks: dict[str, Any] = {}
        while shipping := {r["name"]: r["shipping"] for r in rows if r.get("shipping")}:
            for name, s in shipping.items():
                if name not in tasks:
                    tasks[name] = bars.add_task(f"weights to {name}", total=s["total_bytes"])
                bars.update(tasks[name], completed=s["sent_bytes"], total=s["total_bytes"])
            time.sleep(0.3)
            rows = _client.call("GET", "/devices")
    return rows


@devices_app.command("pair")
@command
def pair_device(
    ttl: Annotated[int, typer.Option(help="Seconds the code stays valid (1 to 3600).")] = 300,
    as_json: JsonOpt = False,
) -> None:
    """A one-time pairing code for a new device, made by the server."""
    result = _client.call("POST", "/devices/pair", {"ttl": ttl})

    def table(d: dict) -> None:
        print(d["code"])
        stderr.print(
            f"On the device, within {ttl} s: appliance-worker --port 50051 --pair {d['code']} "
            f"[--appliance {_client.server}]"
        )

    show(result, as_json, table)


@devices_app.command("revoke")
@command
def revoke_device(name: DeviceArg, as_json: JsonOpt = False) -> None:
    """Revoke a device: refused from now on; its layers move to the others at the next token."""
    result = _client.call("POST", f"/devices/{name}/revoke")
    show(result, as_json, lambda d: print(f"revoked {d['revoked_certificates']} certificate(s) of {name}"))


@devices_app.command()
@command
def drain(name: DeviceArg, as_json: JsonOpt = False) -> None:
    """Stop using a connected device (it stays paired); its layers move to the others at the next token."""
    result = _client.call("POST", f"/devices/{name}/drain")
    show(result, as_json, lambda d: print(f"drained {name} ({', '.join(d['drained'])})"))


# -- workers (this machine's files) ---------------------------------------------------------------
@workers_app.command()
@command
def pair(
    ttl: Annotated[int, typer.Option(help="Seconds the code stays valid (1 to 3600).")] = 300,
    as_json: JsonOpt = False,
) -> None:
    """Print a one-time pairing code for a new worker."""
    from offload.pki import certificate_authority

    code = certificate_authority().new_code(ttl)
    show({"code": code, "ttl": ttl}, as_json, lambda d: print(code))
    within = f"{ttl // 60} min" if ttl % 60 == 0 else f"{ttl} s"
    stderr.print(
        f"On the device, within {within}: appliance-worker --port 50051 --pair {code} "
        "[--appliance https://THIS-APPLIANCE:8000]"
    )


@workers_app.command("list")
@command
def list_workers(as_json: JsonOpt = False) -> None:
    """Paired devices, and whether their certificates are revoked."""
    from offload.pki import certificate_authority

    ca = certificate_authority()
    revoked = ca.revoked_serials()
    rows = []
    for name, entry in ca.workers().items():
        serials = {int(s) for s in entry["serials"]}
        rows.append(
            {"name": name, "certificates": len(serials), "state": "revoked" if serials <= revoked else "paired"}
        )
    show(rows, as_json, lambda r: _table(f"paired devices (CA in {ca.folder})", r, ["name", "certificates", "state"]))


@workers_app.command()
@command
def revoke(name: DeviceArg, as_json: JsonOpt = False) -> None:
    """Revoke a device's certificates: the appliance no longer uses it (re-pair to use it again)."""
    from offload.pki import PairingError, certificate_authority

    try:
        n = certificate_authority().revoke(name)
    except PairingError as e:
        raise CtlError(str(e), 5) from e
    show({"name": name, "revoked_certificates": n}, as_json, lambda d: print(f"revoked {n} certificate(s) of {name}"))


# -- the CA (this machine's files) -----------------------------------------------------------------
@ca_app.command("export")
@command
def export_ca(as_json: JsonOpt = False) -> None:
    """Print the CA certificate (PEM, on stdout) and its SHA-256 fingerprint (on stderr): trust it once on
    each device, and compare the fingerprint with the one `appliance serve` prints."""
    from offload.pki import certificate_authority

    ca = certificate_authority()
    if as_json:
        print(json.dumps({"pem": ca.ca_pem.decode(), "sha256": ca.fingerprint(), "path": str(ca.folder / "ca.pem")}))
        return
    sys.stdout.write(ca.ca_pem.decode())
    stderr.print(f"SHA-256 fingerprint: {ca.fingerprint()}")


@ca_app.command("issue")
@command
def issue_client(
    name: Annotated[str, typer.Argument(help="The device's name (like a host name).")],
    out: Annotated[Path | None, typer.Option(help="Folder for admin.pem, admin.key, ca.pem (default: ./NAME).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A client certificate for a device that administers the appliance (serve --admin-mtls). Copy the
    three files into that device's $APPLIANCE_HOME; `workers revoke NAME` ends it."""
    from offload.pki import PairingError, certificate_authority

    folder = out or Path(name)
    try:
        identity = certificate_authority().issue_client(name, folder)
    except PairingError as e:
        raise CtlError(str(e)) from e
    result = {"name": name, "folder": str(folder), "serial": str(identity.certificate.serial_number)}
    where = f"{folder}/admin.pem, admin.key, ca.pem: copy them into {name}'s $APPLIANCE_HOME"
    show(result, as_json, lambda d: print(where))


# -- sessions ----------------------------------------------------------------------------------
@sessions_app.callback(invoke_without_command=True)
@command
def sessions(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Generations running or waiting now: their tokens and where their layers run."""
    if ctx.invoked_subcommand is not None:
        return
    cols = ["id", "state", "prompt_tokens", "completion_tokens", "max_tokens", "age_s", "layers"]
    show(_client.call("GET", "/sessions"), as_json, lambda rows: _table("sessions", rows, cols))


@sessions_app.command()
@command
def cancel(
    session_id: Annotated[str, typer.Argument(help="The id `sessions` shows.")], as_json: JsonOpt = False
) -> None:
    """End a generation now; its client gets the text so far."""
    show(_client.call("POST", f"/sessions/{session_id}/cancel"), as_json, lambda d: print(f"cancelled {session_id}"))


# -- client keys -------------------------------------------------------------------------------
KeyArg = Annotated[str, typer.Argument(help="The key's name (who or what uses it).")]


@keys_app.command()
@command
def create(name: KeyArg, as_json: JsonOpt = False) -> None:
    """Make a named client API key; it is printed once (the appliance keeps only its SHA-256)."""
    result = _client.call("POST", "/keys", {"name": name})

    def table(d: dict) -> None:
        print(d["key"])
        stderr.print(f"key {name!r}: shown once; revoke with `appliance-ctl keys revoke {name}`")

    show(result, as_json, table)


@keys_app.command("list")
@command
def list_keys(as_json: JsonOpt = False) -> None:
    """The named client keys (names and when made; never the keys)."""

    def table(rows: list[dict]) -> None:
        rows = [{**r, "created": dt.datetime.fromtimestamp(r["created"]).isoformat(timespec="seconds")} for r in rows]
        _table("client keys", rows, ["name", "created"], "none (appliance-ctl keys create NAME)")

    show(_client.call("GET", "/keys"), as_json, table)


@keys_app.command("revoke")
@command
def revoke_key(name: KeyArg, as_json: JsonOpt = False) -> None:
    """Revoke a named key: refused from the next request on, no restart."""
    show(_client.call("DELETE", f"/keys/{name}"), as_json, lambda d: print(f"revoked key {name}"))


# -- the contribution ledger (this machine's files) ----------------------------------------------
def _ledger():
    from offload.ledger import Ledger, ledger_path
    from offload.pki import certificate_authority

    ca = certificate_authority()
    return Ledger(ledger_path(ca.folder.parent), ca.identity())


@ledger_app.command("show")
@command
def show_ledger(as_json: JsonOpt = False) -> None:
    """Every entry (who, what, when) and each device's share."""
    book = _ledger()
    rows = []
    for e in book.entries():
        s = json.loads(e["statement"])
        amounts = {k: v for k, v in s.items() if k not in ("device", "kind", "since", "until", "seq")}
        rows.append({"index": e["index"], "time": e["time"], "device": e["device"], "kind": s["kind"], **amounts})

    def table(d: dict) -> None:
        entries = [
            {**r, "time": dt.datetime.fromtimestamp(r["time"]).isoformat(timespec="seconds"), "amounts": _amounts(r)}
            for r in d["entries"]
        ]
        _table(f"ledger ({book.path})", entries, ["index", "time", "device", "kind", "amounts"], "no entries yet")
        _table("shares", d["shares"], ["device", "compute_s", "compute_share", "hidden_bytes", "rounds", "examples"])

    show({"entries": rows, "shares": book.shares()}, as_json, table)


def _amounts(row: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in row.items() if k not in ("index", "time", "device", "kind"))


@ledger_app.command("verify")
@command
def verify_ledger(as_json: JsonOpt = False) -> None:
    """Check every entry: its place in the chain, the appliance's and the device's signatures. Exit 1
    naming the first entry that fails."""
    from offload.ledger import LedgerError

    book = _ledger()
    try:
        n = book.verify()
    except LedgerError as e:
        raise CtlError(str(e)) from e
    show({"entries": n, "verified": True}, as_json, lambda d: print(f"ledger verified: {n} entries ({book.path})"))


# -- LoRA adapters -----------------------------------------------------------------------------
@adapters_app.command("list")
@command
def list_adapters(as_json: JsonOpt = False) -> None:
    """The adapters served now, each as the model name requests use."""

    def table(rows: list[dict]) -> None:
        _table("adapters", rows, ["model", "rank", "alpha", "layers", "parts", "path"], "none (adapters load FILE)")

    show(_client.call("GET", "/adapters"), as_json, table)


@adapters_app.command("load")
@command
def load_adapter(
    path: Annotated[str, typer.Argument(help="A GGUF LoRA file (convert_lora_to_gguf.py's) on the appliance.")],
    name: Annotated[str | None, typer.Option(help="The adapter's name (default: the file's stem).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve an adapter as MODEL+NAME from the next request on, no restart."""
    import os

    result = _client.call("POST", "/adapters/load", {"path": os.path.abspath(path), "name": name})
    show(result, as_json, lambda d: print(f"serving {d['model']} (rank {d['rank']}, alpha {d['alpha']:g})"))


@adapters_app.command("unload")
@command
def unload_adapter(name: Annotated[str, typer.Argument(help="The adapter's name.")], as_json: JsonOpt = False) -> None:
    """Stop offering an adapter (requests already running finish with it)."""
    show(_client.call("POST", f"/adapters/{name}/unload"), as_json, lambda d: print(f"unloaded adapter {name}"))


if __name__ == "__main__":
    app()
