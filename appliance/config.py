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

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

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
