"""The offload protocol's vocabulary, shared by the appliance's end and the worker's end.

Its name, the gRPC channel both ends open (mutual TLS under the appliance's CA), and the metadata
key a chain uses to name a worker at fault. What crosses the wire is in `wire.py`; which tensors
make a layer is its architecture's `models.arch.ArchSpec.tensors`.
"""

from __future__ import annotations

import grpc

from offload.pki import Identity

PROTOCOL = "appliance.offload.v1"  # the protocol version both ends must speak (also the proto package)
CULPRIT_KEY = "offload-culprit"  # trailing metadata: the address of the worker that sent a malformed tensor
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
GRPC_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.ssl_target_name_override", "appliance-worker"),  # workers live at any LAN address: the CA is the proof
]


def secure_channel(address: str, identity: Identity) -> grpc.Channel:
    """A channel to a worker that shows our certificate and accepts only one signed by our CA."""
    creds = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
    return grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
