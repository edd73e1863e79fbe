"""`appliance-worker`: the process a LAN device runs to host overflow layers."""

from __future__ import annotations

import sys


def main() -> None:
    # The offload service (gRPC streaming, pairing, mTLS) is its own piece of work; until it lands
    # the command says so plainly instead of pretending to serve.
    print("appliance-worker: the offload service is not built yet; layers run on the appliance only.", file=sys.stderr)
    sys.exit(2)
