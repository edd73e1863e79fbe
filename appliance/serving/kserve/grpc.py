"""KServe v2 / Triton over gRPC: the servicer `tritonclient.grpc` ships, filled in over the repository."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from appliance.serving.auth import AuthError, check_key
from appliance.serving.kserve.repository import KServeError, Repository, datatype_of, tensor_bytes, tensor_from
from appliance.serving.scheduler import QueueFullError
from models.errors import ModelError

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_CONTENTS = (
    "bytes_contents",
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
)


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, KServeError):
        return CODES.get(e.status, grpc.StatusCode.INTERNAL), str(e)
    if isinstance(e, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(e)
    if isinstance(e, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e} (retry after {e.retry_after} s)"
    return grpc.StatusCode.INVALID_ARGUMENT, str(e)  # ModelError: the request's fault


def _inputs(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    inputs = {}
    for i, t in enumerate(request.inputs):
        raw = request.raw_input_contents[i] if i < len(request.raw_input_contents) else None
        data = next((list(getattr(t.contents, f)) for f in _CONTENTS if len(getattr(t.contents, f))), [])
        inputs[t.name] = tensor_from(t.name, t.datatype, list(t.shape), data, raw)
    return inputs


def _response(
    request: service_pb2.ModelInferRequest, outputs: dict[str, np.ndarray], final: bool | None = None
) -> service_pb2.ModelInferResponse:
    wanted = [o.name for o in request.outputs] or list(outputs)
    reply = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    for name in wanted:
        if name not in outputs:
            raise KServeError(400, f"model '{request.model_name}' has no output '{name}'; it has {sorted(outputs)}")
        value = outputs[name]
        reply.outputs.add(name=name, datatype=datatype_of(value), shape=list(value.shape))
        reply.raw_output_contents.append(tensor_bytes(value))
    if final is not None:
        reply.parameters["triton_final_response"].bool_param = final
    return reply


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: Repository):
        self.repo = repo

    def _authorize(self, context: grpc.aio.ServicerContext, admin: bool = False) -> None:
        check_key(self.repo.state, dict(context.invocation_metadata()).get("authorization", ""), admin)

    async def _unary(self, context, fn, admin: bool = False):
        """Run one call: check the key, then map our errors to gRPC statuses with their messages."""
        try:
            self._authorize(context, admin)
            result = fn()
            return await result if inspect.isawaitable(result) else result
        except (KServeError, QueueFullError, ModelError, AuthError) as e:
            await context.abort(*_status(e))

    # --- health and metadata ---

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return await self._unary(
            context,
            lambda: service_pb2.ModelReadyResponse(
                ready=self.repo.model(request.name, request.version, need_ready=False).ready
            ),
        )

    async def ServerMetadata(self, request, context):
        return await self._unary(
            context, lambda: json_format.ParseDict(self.repo.server_metadata(), service_pb2.ServerMetadataResponse())
        )

    async def ModelMetadata(self, request, context):
        return await self._unary(
            context,
            lambda: json_format.ParseDict(
                self.repo.metadata(request.name, request.version), service_pb2.ModelMetadataResponse()
            ),
        )

    async def ModelConfig(self, request, context):
        def config():
            cfg = json_format.ParseDict(
                self.repo.config(request.name, request.version),
                model_config_pb2.ModelConfig(),
                ignore_unknown_fields=True,
            )
            return service_pb2.ModelConfigResponse(config=cfg)

        return await self._unary(context, config)

    async def ModelStatistics(self, request, context):
        return await self._unary(
            context,
            lambda: json_format.ParseDict(
                {"model_stats": self.repo.statistics(request.name, request.version)},
                service_pb2.ModelStatisticsResponse(),
                ignore_unknown_fields=True,
            ),
        )

    async def RepositoryIndex(self, request, context):
        return await self._unary(
            context, lambda: json_format.ParseDict({"models": self.repo.index()}, service_pb2.RepositoryIndexResponse())
        )

    async def RepositoryModelLoad(self, request, context):
        def load():
            self.repo.load(request.model_name)
            return service_pb2.RepositoryModelLoadResponse()

        return await self._unary(context, load, admin=True)

    async def RepositoryModelUnload(self, request, context):
        def unload():
            self.repo.unload(request.model_name)
            return service_pb2.RepositoryModelUnloadResponse()

        return await self._unary(context, unload, admin=True)

    # --- inference ---

    async def ModelInfer(self, request, context):
        async def infer():
            inputs = _inputs(request)
            if "stream" in inputs and bool(inputs["stream"].reshape(-1)[0]):
                raise KServeError(400, "streaming is served by ModelStreamInfer, not ModelInfer")
            responses = [r async for r in self.repo.infer(request.model_name, inputs, request.model_version)]
            return _response(request, responses[-1])

        return await self._unary(context, infer)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Decoupled: a response per text piece, the last one marked `triton_final_response`."""
        try:
            self._authorize(context)
        except AuthError as e:
            await context.abort(*_status(e))
        async for request in request_iterator:
            try:
                responses = self.repo.infer(request.model_name, _inputs(request), request.model_version)
                previous = None
                async for r in responses:
                    if previous is not None:
                        yield service_pb2.ModelStreamInferResponse(infer_response=_response(request, previous, False))
                    previous = r
                yield service_pb2.ModelStreamInferResponse(infer_response=_response(request, previous, True))
            except (KServeError, QueueFullError, ModelError) as e:
                yield service_pb2.ModelStreamInferResponse(error_message=_status(e)[1])


async def start_grpc(repo: Repository, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(repo), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server
