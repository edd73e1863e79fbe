"""The admin API (`/admin/...`, admin key): what `appliance-ctl` asks the running appliance.

Status and telemetry, the served models, the LAN devices and the placement of layers on them, the
generations running now, the named client keys, and a quick speed figure. Each answer is JSON a
script can read; `appliance-ctl` turns it into tables. Unknown names are 404 `{"error": "..."}`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from appliance.serving.auth import authorize_admin
from appliance.serving.client_keys import ClientKeys, KeyNameError
from appliance.serving.kserve.repository import Repository
from appliance.serving.scheduler import Event, Ticket
from appliance.serving.state import ServerState, server_state
from models.errors import ModelError, ModelStoreError
from models.sampling import SamplingParams
from models.store import KNOWN_MODELS, ModelSpec, ModelStore
from offload.coordinator import Coordinator, OffloadError
from offload.ledger import Ledger, LedgerError, ledger_path
from offload.pki import PairingError, certificate_authority
from offload.planner import Plan

router = APIRouter(prefix="/admin", dependencies=[Depends(authorize_admin)])
State = Annotated[ServerState, Depends(server_state)]


def _repository(request: Request) -> Repository:
    return request.app.state.kserve


Repo = Annotated[Repository, Depends(_repository)]


def version() -> str:
    try:
        return metadata.version("appliance")
    except metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0.1.0"


def instruction_set() -> str:
    """The widest SIMD this CPU offers that matters for our kernels (from /proc/cpuinfo's flags)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().replace("Features", "flags").split())
    except OSError:
        return platform.machine()
    for isa in ("avx512f", "avx2", "avx", "sse4_2", "sve", "asimd", "neon"):
        if isa in flags:
            return isa
    return platform.machine()


# -- status ------------------------------------------------------------------------------------
def _sample(state: ServerState, name: str) -> float:
    return state.scheduler.metrics.registry.get_sample_value(name) or 0.0


def _tokens_per_s(tickets: list[Ticket]) -> float:
    """The decode rate of the generations running now, summed: each one's tokens since its first."""
    now, rate = time.monotonic(), 0.0
    for t in tickets:
        if t.first_token_at is not None and now > t.first_token_at and t.job.completion_tokens > 1:
            rate += (t.job.completion_tokens - 1) / (now - t.first_token_at)
    return rate


def summary(state: ServerState, repo: Repository) -> dict:
    """What the dashboard (with an API key: nothing here is secret) and `appliance-ctl status` show."""
    scheduler, engine = state.scheduler, state.engine
    active, waiting = list(scheduler.active), list(scheduler.waiting)
    return {
        "version": version(),
        "model": state.model_name,
        "models": repo.index(),
        "backend": engine.model.backend.name,
        "instruction_set": instruction_set(),
        "uptime_s": round(time.time() - state.started, 1),
        "active": len(active),
        "waiting": len(waiting),
        "tokens_per_s": round(_tokens_per_s(active), 2),
        "tokens_total": int(_sample(state, "appliance_tokens_generated_total")),
        "layers": engine.model.config.n_layers,
        "local_layers": [0, engine.offload.first_remote_layer if engine.offload else engine.model.config.n_layers],
        "devices": _devices(state),
        "contributions": _ledger(state).shares(),
        "gpus": scheduler.metrics.gpu.read(),
        "prefix_cache": engine.prefix_cache.stats() if engine.prefix_cache is not None else None,
    }


@router.get("/status")
def status(state: State, repo: Repo) -> dict:
    return summary(state, repo)


# -- models ------------------------------------------------------------------------------------
@router.get("/models")
def models(repo: Repo) -> list[dict]:
    return repo.index()


@router.post("/models/{name}/load")
def load_model(repo: Repo, name: str) -> dict:
    repo.load(name)
    return {"name": repo.state.canonical(name), "state": "READY"}


@router.post("/models/{name}/unload")
def unload_model(repo: Repo, name: str) -> dict:
    repo.unload(name)
    return {"name": repo.state.canonical(name), "state": "UNAVAILABLE"}


# -- the contribution ledger -------------------------------------------------------------------
def _ledger(state: ServerState) -> Ledger:
    """The coordinator's (it appends the workers' statements), else the file, read-only."""
    ledger = getattr(state.engine.offload, "ledger", None)
    if ledger is None:
        ca = certificate_authority()
        ledger = Ledger(ledger_path(ca.folder.parent), ca.identity())
    return ledger


@router.get("/ledger")
def ledger(state: State) -> dict:
    """Each device's share, and whether the whole history verifies (which entry fails, if one does)."""
    book = _ledger(state)
    try:
        entries, problem = book.verify(), None
    except LedgerError as e:
        entries, problem = len(book.lines()), str(e)
    return {"entries": entries, "verified": problem is None, "problem": problem, "shares": book.shares()}


@router.post("/ledger/record")
def record(state: State) -> list[dict]:
    """Ask the workers in use for their statements now (the upkeep does every minute)."""
    coordinator = state.engine.offload
    return coordinator.record_contributions() if isinstance(coordinator, Coordinator) else []


# -- LoRA adapters -----------------------------------------------------------------------------
def _adapter_entry(state: ServerState, adapter) -> dict:
    return {"model": f"{state.model_name}+{adapter.name}", **adapter.describe()}


@router.get("/adapters")
def adapters(state: State) -> list[dict]:
    return [_adapter_entry(state, a) for a in state.adapters.all()]


class AdapterBody(BaseModel):
    path: str = Field(max_length=4096)  # a GGUF LoRA file on the appliance's disk
    name: str | None = Field(None, max_length=64)  # default: the file's stem


@router.post("/adapters/load")
def load_adapter(state: State, body: AdapterBody) -> dict:
    """Read and check the file, then serve it as BASE+NAME from the next request on (no restart)."""
    try:
        return _adapter_entry(state, state.adapters.load(body.path, body.name))
    except ModelError as e:
        raise HTTPException(400, str(e)) from e


@router.post("/adapters/{name}/unload")
def unload_adapter(state: State, name: str) -> dict:
    """New requests can no longer name it; requests already running finish with it."""
    try:
        state.adapters.unload(name)
    except KeyError:
        raise HTTPException(404, f"no adapter {name!r} is loaded; loaded: {state.adapters.names()}") from None
    return {"name": name, "unloaded": True}


def _known(name: str) -> ModelSpec:
    if name not in KNOWN_MODELS:
        raise HTTPException(404, f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


@router.post("/models/{name}/fetch")
def fetch_model(name: str) -> dict:
    """Store a known model on the appliance (a no-op when a verified copy is there); atomic, see ModelStore."""
    try:
        path = ModelStore().get(_known(name))
    except ModelStoreError as e:
        raise HTTPException(400, str(e)) from e
    return {"name": name, "path": str(path)}


@router.delete("/models/{name}")
def remove_model(state: State, name: str) -> dict:
    """Delete a stored model; never the file this server is serving (409: it would be gone at the next start)."""
    store = ModelStore()
    path = store.path_for(_known(name))
    if path.exists() and path.resolve() == Path(state.engine.model.file.path).resolve():
        raise HTTPException(409, f"{name} is the model this appliance serves ({path}): serve another one first")
    try:
        store.remove(KNOWN_MODELS[name])
    except FileNotFoundError as e:
        raise HTTPException(404, f"{name} is not in the model store at {store.root}") from e
    return {"name": name, "path": str(path), "removed": True}


# -- devices -----------------------------------------------------------------------------------
def _devices(state: ServerState) -> list[dict]:
    """Every paired device (from the CA's records), with what the running server knows of it: where it is,
    its layers, its speed and link, when it last answered."""
    ca = certificate_authority()
    revoked = ca.revoked_serials()
    devices: dict[str, dict] = {}
    for name, entry in ca.workers().items():
        serials = {int(s) for s in entry["serials"]}
        devices[name] = {"name": name, "state": "revoked" if serials <= revoked else "paired", "address": None}
    coordinator = state.engine.offload
    if coordinator is None:
        return list(devices.values())
    try:
        plan = _placement(coordinator)
    except OffloadError:  # no placement holds the model now: no device holds layers
        plan = None
    layers = {s.device.address: [s.start, s.stop] for s in (plan.chain if plan else [])}
    hidden = coordinator.hidden_bytes
    for address, (client, device) in list(coordinator.workers.items()):
        usage = coordinator.usage.get(address)
        rows = usage.bytes // hidden if usage else 0
        devices[device.name] = {
            "name": device.name,
            "state": "connected",
            "address": address,
            "layers": layers.get(address),
            "budget_bytes": device.budget_bytes,
            "ms_per_layer": round(device.ms_per_layer, 3),
            "one_way_ms": round(device.one_way_ms, 3),
            "mb_per_s": None if device.bytes_per_ms == float("inf") else round(device.bytes_per_ms / 1e3, 1),
            "last_seen": usage.last_seen if usage and usage.last_seen else None,
            "measured_ms_per_token": round(usage.seconds * 1e3 / rows, 3) if rows else None,
            "shipping": dataclasses.asdict(client.shipping) if client.shipping else None,
            "weights": "own copy" if client.holds(coordinator.file_sha256) else "shipped",
        }
    return list(devices.values())


@router.get("/devices")
def devices(state: State) -> list[dict]:
    return _devices(state)


class PairBody(BaseModel):
    ttl: int = Field(300, description="Seconds the code stays valid (1 to 3600).")


@router.post("/devices/pair")
def pair(body: PairBody) -> dict:
    try:
        return {"code": certificate_authority().new_code(body.ttl), "ttl": body.ttl}
    except PairingError as e:
        raise HTTPException(400, str(e)) from e


def _addresses(state: ServerState, name: str) -> list[str]:
    coordinator = state.engine.offload
    if coordinator is None:
        return []
    return [address for address, (_, device) in list(coordinator.workers.items()) if device.name == name]


@router.post("/devices/{name}/revoke")
def revoke(state: State, name: str) -> dict:
    """Revoke its certificates and stop using it now: its layers move to the others at the next token."""
    try:
        n = certificate_authority().revoke(name)
    except PairingError as e:
        raise HTTPException(404, str(e)) from e
    for address in _addresses(state, name):
        state.engine.offload.drop_worker(address)
    return {"name": name, "revoked_certificates": n}


@router.post("/devices/{name}/drain")
def drain(state: State, name: str) -> dict:
    """Stop using a connected device (it stays paired): its layers move to the others at the next token.
    Until the server restarts, or mDNS (or `--worker` at the next start) brings the device back."""
    addresses = _addresses(state, name)
    if not addresses:
        connected = [d["name"] for d in _devices(state) if d["state"] == "connected"]
        raise HTTPException(404, f"no connected device is named {name!r}; connected: {', '.join(connected) or 'none'}")
    coordinator = state.engine.offload
    for address in addresses:
        with coordinator.lock:
            coordinator.known.discard(address)  # else the upkeep probe takes it back within seconds
        coordinator.drop_worker(address)
    return {"name": name, "drained": addresses}


# -- placement ---------------------------------------------------------------------------------
def _placement(coordinator: Coordinator) -> Plan:
    """The plan in use, unless devices changed since (or none ran yet): then the one the next token gets."""
    with coordinator.lock:
        fresh = coordinator.plan is not None and coordinator.planned_generation == coordinator.generation
        return coordinator.plan if fresh else coordinator.make_plan()


@router.get("/plan")
def plan(state: State) -> dict:
    """Where each layer runs, the planner's predicted ms per token, and the mean measured step time."""
    n = state.engine.model.config.n_layers
    steps = _sample(state, "appliance_step_seconds_count")
    measured = round(_sample(state, "appliance_step_seconds_sum") * 1e3 / steps, 3) if steps else None
    coordinator = state.engine.offload
    if coordinator is None:
        stages = [{"device": "appliance", "address": None, "layers": [0, n]}]
        return {"layers": n, "stages": stages, "predicted_ms_per_token": None, "measured_ms_per_step": measured}
    current = _placement(coordinator)
    measured_by = {d["address"]: d.get("measured_ms_per_token") for d in _devices(state) if d["address"]}
    stages = [
        {
            "device": s.device.name,
            "address": s.device.address,
            "layers": [s.start, s.stop],
            "bytes": s.bytes,
            "ms_per_layer": round(s.device.ms_per_layer, 3),
            "one_way_ms": round(s.device.one_way_ms, 3),
            "measured_ms_per_token": measured_by.get(s.device.address),
            "why": current.why.get(s.device.address, ""),
        }
        for s in current.stages
        if s.stop > s.start or s.device.address is None
    ]
    return {
        "layers": n,
        "stages": stages,
        "left_out": [
            {"device": d.name, "address": d.address, "why": current.why.get(d.address, "")} for d in current.left_out
        ],
        "predicted_ms_per_token": round(current.ms_per_token, 3),
        "measured_ms_per_step": measured,
    }


# -- sessions ----------------------------------------------------------------------------------
def _where(state: ServerState, ticket: Ticket) -> list[str]:
    where = [f"appliance [{a}, {b})" for a, b in state.engine.ranges]
    coordinator = state.engine.offload
    if coordinator is not None and ticket.job.session.remote is not None and coordinator.plan:
        where += [f"{s.device.name} [{s.start}, {s.stop})" for s in coordinator.plan.chain]
    return where


@router.get("/sessions")
def sessions(state: State) -> list[dict]:
    now = time.monotonic()
    rows = []
    for kind, tickets in (("active", list(state.scheduler.active)), ("waiting", list(state.scheduler.waiting))):
        for t in tickets:
            g = t.job
            rows.append(
                {
                    "id": t.id,
                    "state": kind,
                    "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": g.completion_tokens,
                    "max_tokens": g.max_tokens,
                    "age_s": round(now - t.submitted, 2),
                    "layers": _where(state, t),
                }
            )
    return rows


@router.post("/sessions/{session_id}/cancel")
def cancel(state: State, session_id: str) -> dict:
    """End a generation now: its client gets what was generated so far, its slot and caches are freed."""
    scheduler = state.scheduler
    found = next((t for t in [*scheduler.active, *scheduler.waiting] if t.id == session_id), None)
    if found is None or found.cancelled.is_set() or found.closed:
        raise HTTPException(404, f"no running generation has the id {session_id!r}: see `appliance-ctl sessions`")
    found.cancel()
    found.deliver(Event("done", "cancelled"))  # the scheduler drops it silently: end its stream here
    return {"id": session_id, "cancelled": True}


# -- client keys -------------------------------------------------------------------------------
def _keys(state: ServerState) -> ClientKeys:
    return state.client_keys or ClientKeys()


class KeyBody(BaseModel):
    name: str = Field(max_length=64)


@router.get("/keys")
def keys(state: State) -> list[dict]:
    return _keys(state).list()


@router.post("/keys")
def create_key(state: State, body: KeyBody) -> dict:
    """The key is in this answer only: the appliance keeps its SHA-256, not the key."""
    try:
        return {"name": body.name, "key": _keys(state).create(body.name)}
    except KeyNameError as e:
        raise HTTPException(e.status, str(e)) from e


@router.delete("/keys/{name}")
def revoke_key(state: State, name: str) -> dict:
    try:
        _keys(state).revoke(name)
    except KeyNameError as e:
        raise HTTPException(e.status, str(e)) from e
    return {"name": name, "revoked": True}


# -- a quick speed figure ----------------------------------------------------------------------
class BenchBody(BaseModel):
    prompt: str = Field("The capital of France is", max_length=4096)
    max_tokens: int = Field(32, ge=2, le=512)


@router.post("/bench")
async def bench(state: State, body: BenchBody) -> dict:
    """One greedy generation of exactly max_tokens through the scheduler, beside whatever else runs."""
    generation = state.generation(
        state.engine.prompt_ids(body.prompt), SamplingParams(), body.max_tokens, [], ignore_eos=True
    )
    started = time.perf_counter()
    first = None
    stream = state.scheduler.stream(generation)
    try:
        async for _ in stream:
            first = first or time.perf_counter()
    finally:
        stream.cancel()
    done = time.perf_counter()
    decode = generation.completion_tokens - 1
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "ttft_ms": round(((first or done) - started) * 1e3, 1),
        "seconds": round(done - started, 3),
        "decode_tokens_per_s": round(decode / (done - first), 2) if first and done > first and decode > 0 else None,
    }
