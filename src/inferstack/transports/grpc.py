"""The KServe v2 gRPC service (``inference.GRPCInferenceService``).

``GrpcService`` is the servicer: every RPC, written once. Two servers can carry
it (``serve --grpc-server``): inferstack's own gRPC-over-HTTP/2 server
(``transports/grpc_h2.py``, the default: about half the CPU per call) or
``grpc.aio`` (``grpcio``). Either runs on the same event loop as the HTTP app and calls the same model
manager, so both transports see one set of models, queues and statistics.
Errors become gRPC status codes from the error's ``grpc_code`` (NOT_FOUND,
INVALID_ARGUMENT, UNAVAILABLE ...) with the same message HTTP would send.
A cancelled RPC (client gone or deadline passed) cancels its request, which
is dropped from the queue before it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from inferstack import __version__
from inferstack._proto import grpc_service_pb2 as pb
from inferstack._proto import grpc_service_pb2_grpc as pb_grpc
from inferstack.core.errors import (
    InferenceServerError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from inferstack.llm.grpc_stream import generation_version, stream_generation
from inferstack.protocol.grpc_codec import (
    decode_infer_request,
    encode_infer_response,
    parameter_value,
)
from inferstack.protocol.shared_memory import SystemSharedMemory
from inferstack.repository.config import ModelConfigError, parse_config_json
from inferstack.serving import ModelManager
from inferstack.transports.grpc_h2 import GrpcH2Server

log = logging.getLogger("inferstack.grpc")

T = TypeVar("T")


class GrpcService(pb_grpc.GRPCInferenceServiceServicer):
    """Every RPC of the service, bound to one model manager."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        extensions: list[str],
        shared_memory: SystemSharedMemory | None = None,
        server_name: str = "inferstack",
    ) -> None:
        self.manager = manager
        #: The server's system shared memory regions (the same registry HTTP uses).
        self.shared_memory = shared_memory if shared_memory is not None else SystemSharedMemory()
        self.extensions = extensions
        self.server_name = server_name
        #: Set while shutting down: ServerReady turns false.
        self.draining = False

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        """Run one RPC body; an InferenceServerError aborts with its status code."""
        try:
            return await work()
        except InferenceServerError as error:
            log.info("gRPC %s", error.message)
            await context.abort(grpc.StatusCode[error.grpc_code], error.message)
        except ModelConfigError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except asyncio.CancelledError:
            raise
        except Exception:
            # Like HTTP's 500: logged with the traceback, a generic message out.
            log.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")
        raise AssertionError("unreachable")  # context.abort always raises

    # -- health and metadata ------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.draining and self.manager.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.manager.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=__version__, extensions=self.extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            version = self.manager.get(request.name, request.version)
            meta = version.metadata(self.manager.ready_version_numbers(request.name))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            )

        return await self._call(context, work)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        async def work() -> pb.ModelConfigResponse:
            return pb.ModelConfigResponse(config=self.manager.get(request.name, request.version).config)

        return await self._call(context, work)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        async def work() -> pb.ModelStatisticsResponse:
            if request.name and request.version:
                versions = [self.manager.get(request.name, request.version)]
            elif request.name:
                if not self.manager.known(request.name):
                    raise NotFoundError(f"unknown model {request.name!r}")
                versions = [v for v in self.manager.loaded_versions() if v.name == request.name]
            else:
                versions = self.manager.loaded_versions()
            document = {"model_stats": [v.stats.as_triton_dict(v.name, v.version_str) for v in versions]}
            return json_format.ParseDict(document, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

        return await self._call(context, work)

    # -- inference ----------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        version = self.manager.get(request.model_name, request.model_version)
        # The lease keeps regions mapped until the outputs are written, even if
        # they are unregistered meanwhile.
        with self.shared_memory.lease() as shm:
            infer_request, shm_outputs = decode_infer_request(request, shm)
            response = await version.infer(infer_request)
            return encode_infer_response(response, shm_outputs, shm)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._call(context, lambda: self._infer(request))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; each answer is sent as it completes.

        A failed request yields a response with ``error_message`` (and its id)
        and the stream goes on, as in Triton.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def handle(request: pb.ModelInferRequest) -> None:
            try:
                generation = generation_version(self.manager, request)
                if generation is not None:  # tokens stream as they come (docs/llm.md)
                    await stream_generation(generation, request, answers.put)
                    return
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except Exception as error:  # every request gets an answer, even on a bug
                if isinstance(error, InferenceServerError):
                    message = error.message
                else:
                    log.exception("gRPC stream request failed")
                    message = "internal server error; see the server log"
                answer = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )
            await answers.put(answer)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.get_running_loop().create_task(handle(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            await answers.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- repository ---------------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        rows = self.manager.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[entry(name=r["name"], version=r.get("version", ""), state=r.get("state", ""),
                          reason=r.get("reason", "")) for r in rows]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        async def work() -> pb.RepositoryModelLoadResponse:
            self.manager.require_explicit_mode("load")
            override = None
            for key, value in request.parameters.items():
                if key == "config":
                    text = parameter_value(value)
                    if not isinstance(text, str):
                        raise InvalidArgumentError("parameter 'config' must be a string holding JSON")
                    try:
                        override = parse_config_json(text, f"parameter 'config' for {request.model_name!r}")
                    except ModelConfigError as exc:
                        raise InvalidArgumentError(str(exc)) from None
                elif key.startswith("file:"):
                    raise UnsupportedError("loading model files sent in the request is not supported")
            self.manager.repository.model_dir(request.model_name)
            await self.manager.load(request.model_name, override)
            return pb.RepositoryModelLoadResponse()

        return await self._call(context, work)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        async def work() -> pb.RepositoryModelUnloadResponse:
            self.manager.require_explicit_mode("unload")
            await self.manager.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call(context, work)

    # -- system shared memory -----------------------------------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        async def work() -> pb.SystemSharedMemoryStatusResponse:
            response = pb.SystemSharedMemoryStatusResponse()
            for region in self.shared_memory.status(request.name):
                response.regions[region["name"]].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
                )
            return response

        return await self._call(context, work)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        async def work() -> pb.SystemSharedMemoryRegisterResponse:
            self.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._call(context, work)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        async def work() -> pb.SystemSharedMemoryUnregisterResponse:
            self.shared_memory.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._call(context, work)

    # -- not supported (yet) ------------------------------------------------------------

    async def _unsupported(self, context: Any, what: str) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported")


    # Like HTTP: status lists nothing and unregister succeeds (perf_analyzer
    # unregisters both kinds before it starts); only registering is refused.
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> pb.CudaSharedMemoryStatusResponse:
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "CUDA shared memory is not supported by this server; use system shared memory",
        )

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request: Any, context: Any) -> Any:
        return await self._unsupported(context, "trace settings")

    async def LogSettings(self, request: Any, context: Any) -> Any:
        return await self._unsupported(context, "log settings")


#: ``serve --grpc-server`` choices.
GRPC_SERVERS = ("inferstack", "grpcio")


async def start_grpc_server(
    service: GrpcService, host: str, port: int, *, max_message_bytes: int, reuse_port: bool = False,
    implementation: str = "inferstack",
) -> tuple[Any, int]:
    """Start a gRPC server for ``service``; returns it (``await server.stop(grace)``) and its port."""
    if implementation == "grpcio":
        server, bound = create_grpc_server(
            service, host, port, max_message_bytes=max_message_bytes, reuse_port=reuse_port
        )
        await server.start()
        return server, bound
    if implementation != "inferstack":
        raise ValueError(f"unknown gRPC server {implementation!r}; choose one of {', '.join(GRPC_SERVERS)}")
    h2_server = GrpcH2Server(service, host, port, max_message_bytes=max_message_bytes, reuse_port=reuse_port)
    return h2_server, await h2_server.start()


def create_grpc_server(
    service: GrpcService, host: str, port: int, *, max_message_bytes: int, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server bound to ``host:port``; returns it and the bound port.

    SO_REUSEPORT is off unless asked for (``serve --workers``): gRPC turns it on by
    default, which would let a second server start on a taken port and steal half
    of its connections instead of failing.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, bound
