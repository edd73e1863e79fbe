"""The LAN layer: offload protocol, worker server, client, placement, pairing and failover."""
