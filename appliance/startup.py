"""Loading the model under a memory budget: what does not fit goes to paired LAN workers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.console import stderr
from models.draft_model import ModelDrafter
from models.engine import Engine
from models.llama import Llama
from models.speculative import DRAFTS, Speculation, speculation_for
from models.store import ModelStore, ModelStoreError
from offload.errors import WorkerRefused

if TYPE_CHECKING:
    from offload.coordinator import Coordinator


def coordinator_for(
    model: Llama,
    memory_budget: str,
    workers: list[str],
    discover: bool = False,
    wire_dtype: str = "float32",
    step_timeout: float = 10.0,
    discover_wait: float = 10.0,
) -> Coordinator:
    """A coordinator for the layers beyond the budget, with the named (and, with discover, found) workers.

    With discover, it waits up to discover_wait seconds for enough workers to answer mDNS. Workers
    that do not answer now (or drop out later) are probed again in the background.
    """
    from offload.coordinator import Coordinator, OffloadError  # grpc: loaded only when layers may go to workers
    from offload.ledger import Ledger, ledger_path
    from offload.pki import certificate_authority
    from offload.planner import parse_size
    from offload.revocation import RevokedFile

    ca = certificate_authority()
    revoked = RevokedFile(ca.folder / "revoked.json")
    coordinator = Coordinator(model, parse_size(memory_budget), ca.identity(), revoked, wire_dtype, step_timeout)
    coordinator.ledger = Ledger(ledger_path(ca.folder.parent), ca.identity())

    def take(address: str) -> None:
        try:
            device = coordinator.add_worker(address)
            stderr.print(f"worker {device.name} at {address}: {device.budget_bytes / 1e6:.0f} MB free")
        except WorkerRefused as e:
            stderr.print(f"[yellow]not using {e}[/]")

    for address in workers:
        take(address)
    if discover:
        from offload.discovery import WORKER_TYPE, browse

        coordinator.discovery = browse(WORKER_TYPE, lambda a: None if a in coordinator.workers else take(a))
        deadline = time.monotonic() + discover_wait
        while coordinator.first_remote_layer < model.config.n_layers and time.monotonic() < deadline:
            try:
                coordinator.make_plan()
                break
            except OffloadError:
                time.sleep(0.2)  # not enough workers found yet
    coordinator.start_upkeep()
    return coordinator


def load_engine(
    path: Path,
    backend: str,
    memory_budget: str | None = None,
    workers: list[str] | None = None,
    discover: bool = False,
    wire_dtype: str = "float32",
    step_timeout: float = 10.0,
    threads: int | None = None,
    draft: str = "auto",
) -> Engine:
    """The engine, all local when the model fits the budget (or there is none), else split with workers.
    draft: how decode steps speculate (models.speculative.speculation_for: auto, lookup or none), or a draft
    model (a file, or a model of the store) with the same vocabulary, held whole here (models/draft_model.py)."""
    named = draft not in DRAFTS
    draft_path = _draft_model(draft) if named else None  # a missing file is refused before the model loads
    local = None if named else speculation_for(draft, offloading=False)
    model = Llama.load(str(path), backend, threads)
    if draft_path is not None:
        local = Speculation(
            ModelDrafter.load(draft_path, model.file.metadata.get("tokenizer.ggml.tokens"), backend, threads)
        )
    if memory_budget is None:
        return Engine(model, speculation=local)
    coordinator = coordinator_for(model, memory_budget, workers or [], discover, wire_dtype, step_timeout)
    k = coordinator.first_remote_layer
    if k == model.config.n_layers:
        coordinator.close()
        return Engine(model, speculation=local)
    stderr.print(f"memory budget {memory_budget}: layers [0, {k}) here, [{k}, {model.config.n_layers}) on workers")
    remote = local if named else speculation_for(draft)
    return Engine(model, offload=coordinator, speculation=_over_the_lan(remote, coordinator))


def _draft_model(draft: str) -> Path:
    try:
        return ModelStore().resolve(draft)
    except ModelStoreError as e:
        raise ModelStoreError(f"--draft takes {', '.join(DRAFTS)} or a draft model: {e}") from None


def _over_the_lan(speculation: Speculation | None, coordinator: Coordinator) -> Speculation | None:
    """With a LAN round trip in every step, one more row costs a smaller share of it: longer drafts pay."""
    if speculation is None:
        return None
    try:
        plan = coordinator.make_plan()
    except Exception:  # noqa: BLE001  no placement yet: the local figure until one exists
        return speculation
    compute = plan.local.device.ms_per_layer * plan.local.stop
    compute += sum((s.stop - s.start) * s.device.ms_per_layer for s in plan.chain)
    share = compute / max(plan.ms_per_token, 1e-9)
    return Speculation(speculation.drafter, speculation.k_max, speculation.row_cost * share)
