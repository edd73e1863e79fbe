"""`appliance-ctl`: the owner's admin CLI: the model store, and the LAN workers paired with this appliance."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from appliance.console import friendly_errors
from models.errors import ModelStoreError
from models.store import KNOWN_MODELS, ModelStore, verify

app = typer.Typer(
    help="Administer the appliance.", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
)
models_app = typer.Typer(help="The model store.", no_args_is_help=True)
app.add_typer(models_app, name="models")
workers_app = typer.Typer(help="LAN devices that run overflow layers.", no_args_is_help=True)
app.add_typer(workers_app, name="workers")

NameArg = Annotated[str, typer.Argument(help="Model name.")]


def _spec(name: str):
    if name not in KNOWN_MODELS:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


@models_app.command("list")
@friendly_errors
def list_models() -> None:
    """Known models, where they are stored, and whether the stored copy verifies."""
    store = ModelStore()
    table = Table(title=f"model store: {store.root}")
    for col in ("name", "file", "size", "state"):
        table.add_column(col)
    for name, spec in KNOWN_MODELS.items():
        problem = verify(store.path_for(spec), spec)
        table.add_row(name, spec.filename, f"{spec.size / 2**20:.1f} MiB", problem or "verified")
    Console().print(table)


@models_app.command()
@friendly_errors
def fetch(name: NameArg = "smollm2-135m-instruct") -> None:
    """Store a model (no-op if a verified copy is already there); print its path."""
    print(ModelStore().get(_spec(name)))


@models_app.command("verify")
@friendly_errors
def verify_model(name: NameArg = "smollm2-135m-instruct") -> None:
    """Check the stored copy's size and SHA-256; exit 1 if it is missing or damaged."""
    store = ModelStore()
    spec = _spec(name)
    problem = verify(store.path_for(spec), spec)
    if problem:
        raise ModelStoreError(f"{name} at {store.path_for(spec)}: {problem}")
    print(f"{name}: verified ({spec.sha256})")


@workers_app.command()
@friendly_errors
def pair(ttl: Annotated[int, typer.Option(help="Seconds the code stays valid (1 to 3600).")] = 300) -> None:
    """Print a one-time pairing code for a new worker."""
    from offload.pki import certificate_authority

    code = certificate_authority().new_code(ttl)
    print(code)
    within = f"{ttl // 60} min" if ttl % 60 == 0 else f"{ttl} s"
    Console(stderr=True).print(
        f"On the device, within {within}: appliance-worker --port 50051 --pair {code} "
        "[--appliance http://THIS-APPLIANCE:8000]"
    )


@workers_app.command("list")
@friendly_errors
def list_workers() -> None:
    """Paired devices, and whether their certificates are revoked."""
    from offload.pki import certificate_authority

    ca = certificate_authority()
    revoked = ca.revoked_serials()
    table = Table(title=f"paired devices (CA in {ca.folder})")
    for col in ("name", "certificates", "state"):
        table.add_column(col)
    for name, entry in ca.workers().items():
        serials = {int(s) for s in entry["serials"]}
        state = "revoked" if serials <= revoked else "paired"
        table.add_row(name, str(len(serials)), state)
    Console().print(table)


@workers_app.command()
@friendly_errors
def revoke(name: Annotated[str, typer.Argument(help="The device's name, as `workers list` shows it.")]) -> None:
    """Revoke a device's certificates: the appliance no longer uses it (re-pair to use it again)."""
    from offload.pki import certificate_authority

    n = certificate_authority().revoke(name)
    print(f"revoked {n} certificate(s) of {name}")


if __name__ == "__main__":
    app()
