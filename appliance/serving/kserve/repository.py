"""The KServe v2 / Triton model repository, independent of transport (REST and gRPC adapt it).

Each language model appears as two KServe models:
- `NAME`: text in, text out, with the tensor names Triton's LLM backends use (inputs `text_input`,
  `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop_words`, `stream`; outputs
  `text_output`, `finish_reason`, `num_output_tokens`). Decoupled: streamed one response per piece.
- `NAME-logits`: `input_ids` in, the next token's `logits` and `logprobs` out, for scoring.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

from appliance import __version__
from appliance.serving.scheduler import drain
from appliance.serving.state import ServerState
from models.sampling import SamplingParams

MODEL_VERSION = "1"  # each model has one version, this one
EXTENSIONS = [
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "binary_tensor_data",
    "generate",
]


class KServeError(Exception):
    """An error with its HTTP status; the gRPC adapter maps the status to a gRPC code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Stats:
    success: int = 0
    fail: int = 0
    success_ns: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, started_ns: int) -> None:
        spent = time.perf_counter_ns() - started_ns
        if ok:
            self.success, self.success_ns = self.success + 1, self.success_ns + spent
        else:
            self.fail, self.fail_ns = self.fail + 1, self.fail_ns + spent
        self.last_inference_ms = int(time.time() * 1000)


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False


@dataclass
class KServeModel:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    decoupled: bool = False
    ready: bool = True
    stats: Stats = field(default_factory=Stats)


def tensor_from(
    name: object, datatype: object, shape: object, data: object = (), raw: bytes | None = None
) -> np.ndarray:
    """A request input as numpy: from its JSON-style `data` list, or from its raw (binary) bytes."""
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list | tuple):
        raise KServeError(400, "each input needs a string 'name', a string 'datatype' and a list 'shape'")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise KServeError(400, f"input '{name}': shape must be non-negative integers, got {list(shape)}")
    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise KServeError(400, f"input '{name}': unknown datatype '{datatype}'")
    count = math.prod(shape)  # Python's integers: [2**62, 2**62] does not wrap around
    try:
        if raw is not None:
            flat = deserialize_bytes_tensor(raw) if datatype == "BYTES" else np.frombuffer(raw, dtype=dtype)
        elif datatype == "BYTES":
            flat = np.array([_utf8(v) for v in _flat_list(data)], dtype=np.object_)
        else:
            flat = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, AttributeError, OverflowError, IndexError, RecursionError, struct.error) as e:
        raise KServeError(400, f"input '{name}': data does not match datatype {datatype}: {e}") from e
    if flat.size != count:
        raise KServeError(400, f"input '{name}': shape {list(shape)} needs {count} values, got {flat.size}")
    return flat.reshape(shape)


def _flat_list(data: object) -> list:
    """JSON tensor data, flattened (KServe allows nested lists in row-major order)."""
    if not isinstance(data, list | tuple):
        return [data]
    return [v for d in data for v in _flat_list(d)]


def _utf8(value: object) -> bytes:
    """A BYTES element given as JSON: a string (bytes from gRPC's bytes_contents)."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(f"BYTES data must be strings, got {type(value).__name__}")
    return value.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError


def tensor_bytes(value: np.ndarray) -> bytes:
    """An output's binary form: BYTES as 4-byte little-endian length + bytes per element, else raw."""
    return serialize_byte_tensor(value).item() if value.dtype == np.object_ else value.tobytes()


def datatype_of(value: np.ndarray) -> str:
    return "BYTES" if value.dtype == np.object_ else np_to_triton_dtype(value.dtype)


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type, default):
    if name not in inputs:
        return default
    value = inputs[name]
    if value.size != 1:
        raise KServeError(400, f"input '{name}' must hold exactly one value, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    try:
        if kind is bool:
            return bool(item)
        return kind(item.decode() if isinstance(item, bytes) else item)
    except (TypeError, ValueError, OverflowError) as e:
        raise KServeError(400, f"input '{name}' must be {kind.__name__}: {e}") from e


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise KServeError(400, f"input '{name}' is not valid UTF-8") from e
    if isinstance(value, str):
        return value
    raise KServeError(400, f"input '{name}' must be BYTES (a string)")


class Repository:
    def __init__(self, state: ServerState):
        self.state = state
        name, vocab = state.model_name, state.engine.model.config.vocab_size
        self.models = {
            name: KServeModel(
                name,
                [
                    TensorSpec("text_input", "BYTES", [1]),
                    TensorSpec("max_tokens", "INT32", [1], True),
                    TensorSpec("temperature", "FP32", [1], True),
                    TensorSpec("top_p", "FP32", [1], True),
                    TensorSpec("top_k", "INT32", [1], True),
                    TensorSpec("seed", "UINT64", [1], True),
                    TensorSpec("stop_words", "BYTES", [-1], True),
                    TensorSpec("stream", "BOOL", [1], True),
                ],
                [
                    TensorSpec("text_output", "BYTES", [-1]),
                    TensorSpec("finish_reason", "BYTES", [1]),
                    TensorSpec("num_output_tokens", "INT32", [1]),
                ],
                decoupled=True,
            ),
            f"{name}-logits": KServeModel(
                f"{name}-logits",
                [TensorSpec("input_ids", "INT64", [-1])],
                [TensorSpec("logits", "FP32", [vocab]), TensorSpec("logprobs", "FP32", [vocab])],
            ),
        }

    # --- repository and metadata ---

    def model(self, name: str, version: str = "", need_ready: bool = True) -> KServeModel:
        name = self.state.canonical(name)  # another spelling of the served model's name
        if name not in self.models:
            raise KServeError(404, f"unknown model '{name}'; available: {', '.join(self.models)}")
        if version not in ("", MODEL_VERSION):
            raise KServeError(404, f"model '{name}' has no version '{version}'; it has version {MODEL_VERSION}")
        m = self.models[name]
        if need_ready and not m.ready:
            raise KServeError(400, f"model '{name}' is not loaded (load it with the repository API)")
        return m

    def server_metadata(self) -> dict:
        return {"name": "appliance", "version": __version__, "extensions": EXTENSIONS}

    def metadata(self, name: str, version: str = "") -> dict:
        m = self.model(name, version, need_ready=False)
        spec = lambda t: {"name": t.name, "datatype": t.datatype, "shape": t.shape}  # noqa: E731
        return {
            "name": m.name,
            "versions": [MODEL_VERSION],
            "platform": "appliance",
            "inputs": [spec(t) for t in m.inputs],
            "outputs": [spec(t) for t in m.outputs],
        }

    def config(self, name: str, version: str = "") -> dict:
        m = self.model(name, version, need_ready=False)

        def tensor(t: TensorSpec) -> dict:
            data_type = "TYPE_STRING" if t.datatype == "BYTES" else f"TYPE_{t.datatype}"
            return {"name": t.name, "data_type": data_type, "dims": t.shape, "optional": t.optional}

        return {
            "name": m.name,
            "platform": "appliance",
            "backend": "appliance",
            "max_batch_size": 0,
            "input": [tensor(t) for t in m.inputs],
            "output": [tensor(t) for t in m.outputs],
            "model_transaction_policy": {"decoupled": m.decoupled},
        }

    def index(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "version": MODEL_VERSION,
                "state": "READY" if m.ready else "UNAVAILABLE",
                "reason": "" if m.ready else "unloaded",
            }
            for m in self.models.values()
        ]

    def load(self, name: str) -> None:
        self.model(name, need_ready=False).ready = True

    def unload(self, name: str) -> None:
        self.model(name, need_ready=False).ready = False

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        chosen = [self.model(name, version, need_ready=False)] if name else list(self.models.values())
        out = []
        for m in chosen:
            s = m.stats
            out.append(
                {
                    "name": m.name,
                    "version": MODEL_VERSION,
                    "last_inference": s.last_inference_ms,
                    "inference_count": s.success,
                    "execution_count": s.success,
                    "inference_stats": {
                        "success": {"count": s.success, "ns": s.success_ns},
                        "fail": {"count": s.fail, "ns": s.fail_ns},
                        # Each request passes the queue once and is computed once (queue time is in
                        # compute_infer). perf_analyzer finds the model's version by the version whose
                        # queue count grew ("failed to find the requested model version" without -x).
                        "queue": {"count": s.success, "ns": 0},
                        "compute_input": {"count": s.success, "ns": 0},
                        "compute_infer": {"count": s.success, "ns": s.success_ns},
                        "compute_output": {"count": s.success, "ns": 0},
                    },
                    "batch_stats": [],
                }
            )
        return out

    # --- inference ---

    async def infer(self, name: str, inputs: dict[str, np.ndarray], version: str = "") -> AsyncIterator[dict]:
        """Responses for one request, each {output name: array}. The text model streams when asked."""
        m = self.model(name, version)
        started = time.perf_counter_ns()
        ok = False
        try:
            known = {t.name for t in m.inputs}
            if unknown := set(inputs) - known:
                raise KServeError(
                    400, f"unexpected input(s) {sorted(unknown)} for model '{name}'; it takes {sorted(known)}"
                )
            for t in m.inputs:
                if not t.optional and t.name not in inputs:
                    raise KServeError(400, f"model '{name}' needs input '{t.name}'")
            if m is self.models[self.state.model_name]:
                async for response in self._generate(inputs):
                    yield response
            else:
                yield await self._logits(inputs)
            ok = True
        finally:
            m.stats.record(ok, started)

    async def _logits(self, inputs: dict[str, np.ndarray]) -> dict:
        """Scored by the scheduler like any prompt (in chunks between other requests' tokens), never here
        on the event loop."""
        ids = inputs["input_ids"]
        if ids.dtype.kind not in "iu" or ids.ndim != 1 and not (ids.ndim == 2 and ids.shape[0] == 1):
            raise KServeError(400, "input 'input_ids' must be integer ids of shape [n] or [1, n]")
        engine = self.state.engine
        ids = [int(i) for i in ids.reshape(-1)]
        if not ids or min(ids) < 0 or max(ids) >= engine.model.config.vocab_size:
            raise KServeError(
                400,
                f"input_ids must be 1 to {engine.model.config.context_length} ids "
                f"in [0, {engine.model.config.vocab_size})",
            )
        if len(ids) > engine.model.config.context_length:
            raise KServeError(400, f"{len(ids)} ids exceed the context window of {engine.model.config.context_length}")
        scoring = engine.score(ids)
        await drain([self.state.scheduler.stream(scoring)])  # a client that left frees its slot and cache
        logits = scoring.logits
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        return {"logits": logits, "logprobs": logprobs.astype(np.float32)}

    def text_request(self, inputs: dict[str, np.ndarray]):
        """The generation a text-model request asks for, and whether to stream it."""
        text = inputs["text_input"].reshape(-1)
        if text.size != 1:
            raise KServeError(400, f"input 'text_input' must hold one string, got {text.size}")
        prompt = _text(text[0], "text_input")
        stops = [_text(s, "stop_words") for s in inputs["stop_words"].reshape(-1)] if "stop_words" in inputs else []
        try:
            sampling = SamplingParams(
                temperature=_scalar(inputs, "temperature", float, 0.0),
                top_k=_scalar(inputs, "top_k", int, 0),
                top_p=_scalar(inputs, "top_p", float, 1.0),
                seed=_scalar(inputs, "seed", int, None),
            )
        except ValueError as e:
            raise KServeError(400, str(e)) from e
        max_tokens = _scalar(inputs, "max_tokens", int, None)
        generation = self.state.generation(self.state.engine.prompt_ids(prompt), sampling, max_tokens, stops)
        return generation, _scalar(inputs, "stream", bool, False)

    async def _generate(self, inputs: dict[str, np.ndarray]) -> AsyncIterator[dict]:
        generation, stream = self.text_request(inputs)
        tokens = self.state.scheduler.stream(generation)
        try:
            async for piece in tokens:
                if stream:
                    yield {"text_output": np.array([piece.encode()], dtype=np.object_)}
        finally:
            tokens.cancel()
        yield {
            "text_output": np.array([b"" if stream else generation.text.encode()], dtype=np.object_),
            "finish_reason": np.array([(generation.finish_reason or "").encode()], dtype=np.object_),
            "num_output_tokens": np.array([generation.completion_tokens], dtype=np.int32),
        }
