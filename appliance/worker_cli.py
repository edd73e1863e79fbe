"""`appliance-worker`: offload.worker's command, with its defaults from config.toml and APPLIANCE_WORKER_*."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.markup import escape

from appliance.config import ConfigError, default_map
from appliance.console import stderr


def worker_command() -> Any:
    from offload.worker import cli as worker_cli

    return typer.main.get_command(worker_cli)


def main() -> None:
    command = worker_command()
    try:
        defaults = default_map("worker", command)
    except ConfigError as e:
        stderr.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(1)
    command.main(default_map=defaults, prog_name="appliance-worker")
