"""KServe v2 / Triton over REST, with the binary-tensor and generate extensions (`tritonclient.http`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.serving.auth import authorize, authorize_admin
from appliance.serving.kserve.repository import KServeError, Repository, datatype_of, tensor_bytes, tensor_from

HEADER_LENGTH = "Inference-Header-Content-Length"


def repository(request: Request) -> Repository:
    return request.app.state.kserve


Repo = Annotated[Repository, Depends(repository)]
health = APIRouter(prefix="/v2")  # liveness and readiness need no key, as load balancers ask them
router = APIRouter(prefix="/v2", dependencies=[Depends(authorize)])
admin = APIRouter(prefix="/v2/repository", dependencies=[Depends(authorize_admin)])


# --- tensors in and out ---


def _parse_infer(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        split = int(header_length) if header_length is not None else len(body)
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as e:
        raise KServeError(400, f"the request is not valid JSON: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise KServeError(400, "the request needs an 'inputs' list")
    blob, offset, inputs = body[split:], 0, {}
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise KServeError(400, "each input must be an object")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(blob):
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
    reply = {"model_name": model, "model_version": "1", "outputs": described}
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
async def ready() -> dict:
    return {"ready": True}


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
    responses = [r async for r in repo.infer(name, inputs, version)]
    return _infer_response(name, header, responses[-1])


async def _generate_inputs(request: Request, stream: bool) -> dict[str, np.ndarray]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise KServeError(400, f"the request is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise KServeError(400, "the request must be a JSON object")
    fields = {**(body.pop("parameters", None) or {}), **body, "stream": stream}
    inputs = {}
    for key, value in fields.items():
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            inputs[key] = np.array([v.encode() for v in np.atleast_1d(value)], dtype=np.object_)
        elif isinstance(value, bool | int | float):
            inputs[key] = np.array([value])
        else:
            raise KServeError(400, f"field '{key}' must be a string, a list of strings, or a number")
    return inputs


def _as_json(name: str, outputs: dict[str, np.ndarray]) -> dict:
    reply: dict = {"model_name": name, "model_version": "1"}
    for key, value in outputs.items():
        item = value.reshape(-1)[0]
        reply[key] = item.decode("utf-8", "replace") if isinstance(item, bytes) else item.item()
    return reply


@router.post("/models/{name}/generate")
@router.post("/models/{name}/versions/{version}/generate")
async def generate(request: Request, repo: Repo, name: str, version: str = "") -> dict:
    inputs = await _generate_inputs(request, stream=False)
    responses = [r async for r in repo.infer(name, inputs, version)]
    return _as_json(name, responses[-1])


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
