"""Finding each other on the LAN by mDNS (`zeroconf`): workers and the appliance announce themselves."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

WORKER_TYPE = "_appl-offload._tcp.local."  # service names are at most 15 bytes
APPLIANCE_TYPE = "_appliance._tcp.local."


def _zeroconf() -> Zeroconf:
    """All interfaces, or those in APPLIANCE_MDNS_INTERFACES (comma-separated addresses; tests use loopback)."""
    chosen = os.environ.get("APPLIANCE_MDNS_INTERFACES")
    return Zeroconf(interfaces=chosen.split(",")) if chosen else Zeroconf()


def _addresses() -> list[bytes]:
    chosen = os.environ.get("APPLIANCE_MDNS_INTERFACES")
    if chosen:
        return [socket.inet_aton(a) for a in chosen.split(",")]
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        return sorted({socket.inet_aton(i[4][0]) for i in infos})
    except OSError:
        return [socket.inet_aton("127.0.0.1")]


def advertise(service_type: str, name: str, port: int, properties: dict[str, str] | None = None) -> Zeroconf:
    """Announce a service until the returned Zeroconf is closed."""
    zc = _zeroconf()
    info = ServiceInfo(
        service_type,
        f"{name}.{service_type}",
        addresses=_addresses(),
        port=port,
        properties=properties or {},
        server=f"{socket.gethostname()}.local.",
    )
    zc.register_service(info, allow_name_change=True)
    return zc


def advertise_worker(name: str, port: int) -> Zeroconf:
    return advertise(WORKER_TYPE, name, port)


def browse(service_type: str, found: Callable[[str], None], scheme: bool = False) -> Zeroconf:
    """Call found("host:port") for each instance of a service seen on the LAN, until closed (with `scheme`:
    "SCHEME://host:port", from the announcement's `scheme` property, http when absent)."""
    zc = _zeroconf()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info and info.parsed_addresses():
            address = f"{info.parsed_addresses()[0]}:{info.port}"
            if scheme:
                address = f"{(info.properties.get(b'scheme') or b'http').decode()}://{address}"
            found(address)

    ServiceBrowser(zc, service_type, handlers=[on_change])
    return zc


def find_appliance(timeout: float = 5.0) -> str | None:
    """The first appliance announced on the LAN, as https://host:port (http:// for a plain one), or None."""
    seen: list[str] = []
    event = threading.Event()
    zc = browse(APPLIANCE_TYPE, lambda address: (seen.append(address), event.set()), scheme=True)
    try:
        event.wait(timeout)
    finally:
        zc.close()
    return seen[0] if seen else None
