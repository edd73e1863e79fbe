"""The appliance: inference server, admin CLI and commands."""
