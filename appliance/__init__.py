"""The appliance: inference server, admin CLI and commands."""

__version__ = "0.1.0"  # the one place; pyproject.toml reads it
