"""KServe v2 / Triton over REST, with the binary-tensor and generate extensions (`tritonclient.http`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.serving.auth import authorize, authorize_admin
from appliance.serving.disconnect import unless_client_leaves
from appliance.serving.errors import plain_error_body
from appliance.serving.kserve.repository import (
    MODEL_VERSION,
    KServeError,
    Repository,
    datatype_of,
    tensor_bytes,
    tensor_from,
)
from appliance.serving.scheduler import GenerationError

HEADER_LENGTH = "Inference-Header-Content-Length"


def repository(request: Request) -> Repository:
    return request.app.state.kserve


Repo = Annotated[Repository, Depends(repository)]
health = APIRouter(prefix="/v2")  # liveness and readiness need no key, as load balancers ask them
router = APIRouter(prefix="/v2", dependencies=[Depends(authorize)])
admin = APIRouter(prefix="/v2/repository", dependencies=[Depends(authorize_admin)])


# --- tensors in and out ---


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise KServeError(400, f"the request is not valid JSON: {e}") from e


def _parameters(owner: dict, what: str) -> dict:
    params = owner.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise KServeError(400, f"{what}: 'parameters' must be an object")
    return params


def _parse_infer(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The request's JSON header (every field the reply will use checked now) and its input tensors."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise KServeError(400, f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}")
        split = int(header_length)
    header = _json(body[:split])
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise KServeError(400, "the request needs an 'inputs' list")
    _parameters(header, "the request")
    outputs = header.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    ):
        raise KServeError(400, "'outputs' must be a list of objects with a string 'name'")
    for o in outputs or []:
        _parameters(o, f"output '{o['name']}'")
    blob, offset, inputs = body[split:], 0, {}
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise KServeError(400, "each input must be an object")
        size = _parameters(spec, f"input '{spec.get('name')}'").get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(blob):
                raise KServeError(400, f"input '{spec.get('name')}': binary_data_size {size} overruns the body")
            raw, offset = blob[offset : offset + size], offset + size
        inputs[spec.get("name")] = tensor_from(
            spec.get("name"), spec.get("datatype"), spec.get("shape"), spec.get("data", []), raw
        )
    return header, inputs


def _infer_response(model: str, header: dict, outputs: dict[str, np.ndarray]) -> Response:
    wanted = header.get("outputs") or [{"name": n} for n in outputs]
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    described, blobs = [], []
    for want in wanted:
        name = want.get("name")
        if name not in outputs:
            raise KServeError(400, f"model '{model}' has no output '{name}'; it has {sorted(outputs)}")
        value = outputs[name]
        out = {"name": name, "datatype": datatype_of(value), "shape": list(value.shape)}
        if (want.get("parameters") or {}).get("binary_data", binary_default):
            raw = tensor_bytes(value)
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif value.dtype == np.object_:
            out["data"] = [v.decode("utf-8", "replace") for v in value.reshape(-1)]
        else:
            out["data"] = value.reshape(-1).tolist()
        described.append(out)
    reply = {"model_name": model, "model_version": MODEL_VERSION, "outputs": described}
    if "id" in header:
        reply["id"] = header["id"]
    if not blobs:
        return JSONResponse(reply)
    head = json.dumps(reply).encode()
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )


# --- endpoints ---


@health.get("/health/live")
async def live() -> dict:
    return {"live": True}


@health.get("/health/ready")
async def ready(repo: Repo) -> JSONResponse:
    """Ready while the engine can serve (503 when its scheduler stopped or its steps keep failing)."""
    ok = repo.state.scheduler.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("")
async def server_metadata(repo: Repo) -> dict:
    return repo.server_metadata()


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(repo: Repo, name: str, version: str = "") -> Response:
    m = repo.model(name, version, need_ready=False)
    return Response(status_code=200 if m.ready else 400)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(repo: Repo, name: str, version: str = "") -> dict:
    return repo.metadata(name, version)


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def model_config(repo: Repo, name: str, version: str = "") -> dict:
    return repo.config(name, version)


@router.get("/models/stats")
@router.get("/models/{name}/stats")
@router.get("/models/{name}/versions/{version}/stats")
async def model_stats(repo: Repo, name: str = "", version: str = "") -> dict:
    return {"model_stats": repo.statistics(name, version)}


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, repo: Repo, name: str, version: str = "") -> Response:
    header, inputs = _parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
    if "stream" in inputs and bool(inputs["stream"].reshape(-1)[0]):
        raise KServeError(400, "streaming is served by /generate_stream and gRPC ModelStreamInfer, not /infer")
    return _infer_response(name, header, await unless_client_leaves(request, _last(repo.infer(name, inputs, version))))


async def _last(responses: AsyncIterator[dict]) -> dict:
    last = None
    async for last in responses:  # noqa: B007 (a non-streamed request's answer is its last response)
        pass
    return last


async def _generate_inputs(request: Request, stream: bool) -> dict[str, np.ndarray]:
    body = _json(await request.body())
    if not isinstance(body, dict):
        raise KServeError(400, "the request must be a JSON object")
    fields = {**_parameters(body, "the request"), **body, "stream": stream}
    fields.pop("parameters", None)
    inputs = {}
    for key, value in fields.items():
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            try:
                inputs[key] = np.array([v.encode() for v in ([value] if isinstance(value, str) else value)], np.object_)
            except UnicodeEncodeError as e:
                raise KServeError(400, f"field '{key}' is not valid Unicode text (a lone surrogate)") from e
        elif isinstance(value, bool | int | float):
            inputs[key] = np.array([value], dtype=np.object_)  # Python's number as sent (any size)
        else:
            raise KServeError(400, f"field '{key}' must be a string, a list of strings, or a number")
    return inputs


def _as_json(name: str, outputs: dict[str, np.ndarray]) -> dict:
    reply: dict = {"model_name": name, "model_version": MODEL_VERSION}
    for key, value in outputs.items():
        item = value.reshape(-1)[0]
        reply[key] = item.decode("utf-8", "replace") if isinstance(item, bytes) else item.item()
    return reply


@router.post("/models/{name}/generate")
@router.post("/models/{name}/versions/{version}/generate")
async def generate(request: Request, repo: Repo, name: str, version: str = "") -> dict:
    inputs = await _generate_inputs(request, stream=False)
    return _as_json(name, await unless_client_leaves(request, _last(repo.infer(name, inputs, version))))


@router.post("/models/{name}/generate_stream")
@router.post("/models/{name}/versions/{version}/generate_stream")
async def generate_stream(request: Request, repo: Repo, name: str, version: str = "") -> StreamingResponse:
    inputs = await _generate_inputs(request, stream=True)
    responses = repo.infer(name, inputs, version)
    first = await anext(responses)  # errors (unknown model, bad input, full queue) surface before any byte

    async def events() -> AsyncIterator[str]:
        try:
            yield f"data: {json.dumps(_as_json(name, first))}\n\n"
            async for r in responses:
                yield f"data: {json.dumps(_as_json(name, r))}\n\n"
        except GenerationError as e:  # the headers are gone: the failure is the last event
            yield f"data: {json.dumps(plain_error_body(str(e)))}\n\n"
        finally:
            await responses.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/repository/index")
async def repository_index(repo: Repo) -> list[dict]:
    return repo.index()


@admin.post("/models/{name}/load")
async def load(repo: Repo, name: str) -> dict:
    repo.load(name)
    return {}


@admin.post("/models/{name}/unload")
async def unload(repo: Repo, name: str) -> dict:
    repo.unload(name)
    return {}
