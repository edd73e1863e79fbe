"""What crosses the network: hidden states as Activation messages, layer tensors as a manifest.

Only hidden states ever leave the appliance; token ids and text stay on it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from offload import offload_pb2 as pb

PROTOCOL = "appliance.offload.v1"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
CHUNK_BYTES = 1 << 20  # tensor upload chunks; well under gRPC's 4 MiB message limit
MAX_ROWS = 4096  # positions per Activation (a prefill chunk)


class MalformedTensor(ValueError):
    """A hidden-state message that does not hold what it says it holds."""


def encode(hidden: np.ndarray, session_id: str, step: int, dtype: str = "float32") -> pb.Activation:
    rows, cols = hidden.shape
    data = np.ascontiguousarray(hidden, dtype=WIRE_DTYPES[dtype]).astype("<" + np.dtype(WIRE_DTYPES[dtype]).str[1:])
    return pb.Activation(session_id=session_id, step=step, rows=rows, cols=cols, dtype=dtype, data=data.tobytes())


def decode(msg: pb.Activation, cols: int) -> np.ndarray:
    """The hidden states [rows, cols] as float32, or MalformedTensor saying what is wrong."""
    if msg.dtype not in WIRE_DTYPES:
        raise MalformedTensor(f"wire dtype {msg.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if msg.cols != cols or not 0 < msg.rows <= MAX_ROWS:
        raise MalformedTensor(f"hidden states must be [1..{MAX_ROWS}, {cols}], got [{msg.rows}, {msg.cols}]")
    width = np.dtype(WIRE_DTYPES[msg.dtype]).itemsize
    if len(msg.data) != msg.rows * msg.cols * width:
        raise MalformedTensor(f"{len(msg.data)} bytes do not hold [{msg.rows}, {msg.cols}] {msg.dtype}")
    x = np.frombuffer(msg.data, dtype="<" + np.dtype(WIRE_DTYPES[msg.dtype]).str[1:]).reshape(msg.rows, msg.cols)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise MalformedTensor("hidden states hold NaN or infinity")
    return x


def tensor_spec(name: str, qtype: int, shape: tuple[int, ...], raw: np.ndarray) -> pb.TensorSpec:
    data = memoryview(np.ascontiguousarray(raw)).cast("B")
    return pb.TensorSpec(
        name=name, ggml_type=int(qtype), shape=list(shape), sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data)
    )


def chunks(spec: pb.TensorSpec, raw: np.ndarray):
    data = memoryview(np.ascontiguousarray(raw)).cast("B")
    for offset in range(0, max(len(data), 1), CHUNK_BYTES):
        piece = bytes(data[offset : offset + CHUNK_BYTES])
        yield pb.TensorChunk(sha256=spec.sha256, offset=offset, data=piece, last=offset + CHUNK_BYTES >= len(data))
