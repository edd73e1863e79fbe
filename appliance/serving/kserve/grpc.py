"""KServe v2 / Triton over gRPC: the servicer `tritonclient.grpc` ships, filled in over the repository."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from cryptography import x509
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from appliance.serving.auth import AuthError, CertificateRequired, check_admin_certificate, check_key
from appliance.serving.kserve.repository import (
    MODEL_VERSION,
    KServeError,
    Repository,
    datatype_of,
    tensor_bytes,
    tensor_from,
)
from appliance.serving.scheduler import GenerationError, QueueFullError
from models.errors import ModelError

log = logging.getLogger("appliance")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
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


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    """gRPC's error shape, the one place it is chosen: a status code and a message."""
    if isinstance(e, KServeError):
        return CODES.get(e.status, grpc.StatusCode.INTERNAL), str(e)
    if isinstance(e, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(e)
    if isinstance(e, CertificateRequired):
        return grpc.StatusCode.PERMISSION_DENIED, str(e)
    if isinstance(e, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e} (retry after {e.retry_after} s)"
    if isinstance(e, ModelError | Malformed):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)  # the request's fault
    if isinstance(e, GenerationError):
        return grpc.StatusCode.INTERNAL, str(e)
    log.error("unhandled error in a gRPC call", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


class Malformed(Exception):
    """Bytes that are not the request message (given to the handler in its place, to refuse with a status)."""


def _parser(cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except DecodeError as e:  # grpc's own deserializer failure would be an UNKNOWN status
            return Malformed(f"the request is not a valid {cls.DESCRIPTOR.name}: {e}")

    return parse


def _checked(behaviour: Callable) -> Callable:
    async def handler(request, context):
        if isinstance(request, Malformed):
            await context.abort(*status_of(request))
        return await behaviour(request, context)

    return handler


def add_servicer(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register the Triton service with deserializers that turn garbage bytes into INVALID_ARGUMENT."""
    handlers = {}
    for method in SERVICE.methods:
        request_cls, response_cls = (
            getattr(service_pb2, method.input_type.name),
            getattr(service_pb2, method.output_type.name),
        )
        behaviour = getattr(servicer, method.name)
        kw = dict(request_deserializer=_parser(request_cls), response_serializer=response_cls.SerializeToString)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **kw)
        else:  # every other method of the service is unary
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_checked(behaviour), **kw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


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
    reply = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION, id=request.id)
    for name in wanted:
        if name not in outputs:
            raise KServeError(400, f"model '{request.model_name}' has no output '{name}'; it has {sorted(outputs)}")
        value = outputs[name]
        reply.outputs.add(name=name, datatype=datatype_of(value), shape=list(value.shape))
        reply.raw_output_contents.append(tensor_bytes(value))
    if final is not None:
        reply.parameters["triton_final_response"].bool_param = final
    return reply


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # what we do not serve: UNIMPLEMENTED
    def __init__(self, repo: Repository):
        self.repo = repo

    def _authorize(self, context: grpc.aio.ServicerContext, admin: bool = False) -> None:
        if admin and self.repo.state.admin_ca is not None:
            pem = context.auth_context().get("x509_pem_cert")  # none: the gRPC port asks for no client certificate
            check_admin_certificate(self.repo.state, x509.load_pem_x509_certificate(pem[0]) if pem else None)
        check_key(self.repo.state, dict(context.invocation_metadata()).get("authorization", ""), admin)

    async def _unary(self, context, fn, admin: bool = False):
        """Run one call: check the key, then map our errors to gRPC statuses with their messages."""
        try:
            self._authorize(context, admin)
            result = fn()
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every error, expected or not, becomes a status with its message
            await context.abort(*status_of(e))

    # --- health and metadata ---

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.repo.state.scheduler.ready)

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
        """Decoupled: a response per text piece, the last one marked `triton_final_response`.

        A request that fails gets one response with its `error_message`; the stream serves the next."""
        try:
            self._authorize(context)
        except AuthError as e:
            await context.abort(*status_of(e))
        async for request in request_iterator:
            try:
                if isinstance(request, Malformed):
                    raise request
                responses = self.repo.infer(request.model_name, _inputs(request), request.model_version)
                previous = None
                async for r in responses:
                    if previous is not None:
                        yield service_pb2.ModelStreamInferResponse(infer_response=_response(request, previous, False))
                    previous = r
                yield service_pb2.ModelStreamInferResponse(infer_response=_response(request, previous, True))
            except Exception as e:
                yield service_pb2.ModelStreamInferResponse(error_message=status_of(e)[1])


async def start_grpc(
    repo: Repository, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> grpc.aio.Server:
    """The gRPC server, listening (over TLS with `credentials`); a port already in use (even by another
    gRPC server) is a ValueError."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # gRPC's default shares a port silently
    add_servicer(KServeServicer(repo), server)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises on a failed bind; older versions returned 0
        raise ValueError(f"cannot listen for gRPC on {host}:{port}: the port is in use or the address is wrong") from e
    if bound == 0:
        raise ValueError(f"cannot listen for gRPC on {host}:{port}: the port is in use or the address is wrong")
    await server.start()
    return server
