"""One configuration story for `appliance serve` and `appliance-worker`: flags, then `APPLIANCE_*`
environment variables, then `$APPLIANCE_HOME/config.toml`, then the built-in defaults.

The commands keep their typer options as they are; this module only turns the file and the
environment into click's `default_map` (which a flag on the command line still overrides), checking
every key against the command's own options and every value with the option's own type, so an
unknown key or a bad value stops the command at start-up with the key's name and where it came from.

    # $APPLIANCE_HOME/config.toml
    [serve]
    http_port = 8080
    memory_budget = "6GB"
    worker = ["laptop.local:50051"]

    [worker]
    memory_budget = "2GB"

Environment: `APPLIANCE_HTTP_PORT=8080` (serve), `APPLIANCE_WORKER_MEMORY_BUDGET=2GB` (worker); lists
are comma-separated.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from models.store import default_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = {"serve": "APPLIANCE_", "worker": "APPLIANCE_WORKER_"}
SECRET = {"api_key", "admin_key"}


class ConfigError(ValueError):
    """An unknown key or a bad value in the file or the environment; the message names it."""


@dataclass
class Setting:
    value: Any
    source: str  # "default", "config.toml", or the environment variable's name


def config_path() -> Path:
    return default_root().parent / "config.toml"


def read_file(path: Path | None = None) -> dict[str, dict]:
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    if unknown := set(data) - set(ENV_PREFIX):
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; sections are {sorted(ENV_PREFIX)}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table of settings")
    return data


def _options(command: Any) -> dict[str, Any]:
    """The command's options by parameter name (typer vendors its own click: duck-typed here)."""
    return {p.name: p for p in command.params if p.param_type_name == "option" and p.name}


def settings(section: str, command: Any, environ: dict[str, str] | None = None) -> dict[str, Setting]:
    """Each option's effective value before flags: the environment's, else the file's, else the default."""
    environ = os.environ if environ is None else environ
    options = _options(command)
    path = config_path()
    filed = read_file(path).get(section, {})
    ctx = typer.Context(command)
    out: dict[str, Setting] = {}
    for key, value in filed.items():
        name = key.replace("-", "_")
        if name not in options:
            raise ConfigError(f"{path}: [{section}] has an unknown key {key!r}; known: {', '.join(sorted(options))}")
        out[name] = Setting(_check(ctx, options[name], value, f"{path} [{section}] {key}"), "config.toml")
    prefix = ENV_PREFIX[section]
    for name, option in options.items():
        var = prefix + name.upper()
        if var in environ and not (section == "serve" and var.startswith(ENV_PREFIX["worker"])):
            raw: Any = environ[var]
            if option.multiple:
                raw = [v.strip() for v in raw.split(",") if v.strip()]
            out[name] = Setting(_check(ctx, option, raw, f"environment variable {var}"), var)
    return {name: out.get(name, Setting(option.default, "default")) for name, option in options.items()}


def _check(ctx: typer.Context, option: Any, value: Any, where: str) -> Any:
    """The value converted by the option's own type; ConfigError naming `where` if it does not fit."""
    if option.multiple and not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list (it may be given several times)")
    if not option.multiple and isinstance(value, list | dict):
        raise ConfigError(f"{where}: must be a single value, not {type(value).__name__}")
    try:
        return option.process_value(ctx, value)
    except typer.BadParameter as e:
        raise ConfigError(f"{where}: {e.message}") from e


def default_map(section: str, command: Any) -> dict[str, Any]:
    """What click takes as defaults (a flag still wins): only the values that came from the file or the environment."""
    return {name: s.value for name, s in settings(section, command).items() if s.source != "default"}


def serve_command() -> Any:
    from appliance.cli import app as appliance_app

    return typer.main.get_command(appliance_app).commands["serve"]  # type: ignore[attr-defined]


def worker_command() -> Any:
    from offload.worker import cli as worker_cli

    return typer.main.get_command(worker_cli)


def worker_main() -> None:
    """`appliance-worker`: the worker's own command, with its defaults from the file and the environment."""
    from appliance.console import stderr

    command = worker_command()
    try:
        defaults = default_map("worker", command)
    except ConfigError as e:
        stderr.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(1)
    command.main(default_map=defaults, prog_name="appliance-worker")


# -- `appliance config show` ---------------------------------------------------------------------
app = typer.Typer(help="The configuration: config.toml, APPLIANCE_* variables, flags.", no_args_is_help=True)


@app.command()
def show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False) -> None:
    """Each effective setting of `serve` and `appliance-worker` (before flags) and where it comes from."""
    from rich.console import Console
    from rich.table import Table

    from appliance.console import stderr

    try:
        found = {"serve": settings("serve", serve_command()), "worker": settings("worker", worker_command())}
    except ConfigError as e:
        stderr.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(1)
    rows = {
        section: {
            name: {"value": "(secret)" if name in SECRET and s.value else s.value, "source": s.source}
            for name, s in values.items()
        }
        for section, values in found.items()
    }
    if as_json:
        print(json.dumps({"file": str(config_path()), **rows}, indent=2, default=str))
        return
    console = Console(highlight=False)
    console.print(f"config file: {config_path()}" + ("" if config_path().is_file() else " (none)"))
    for section, values in rows.items():
        table = Table(title=escape(f"[{section}]"))
        for col in ("setting", "value", "source"):
            table.add_column(col)
        for name, row in values.items():
            table.add_row(name, str(row["value"]), row["source"])
        console.print(table)
