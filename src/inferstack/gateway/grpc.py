"""The gateway's gRPC side: a ``grpc.aio`` proxy of ``inference.GRPCInferenceService``.

Messages stay bytes end to end (identity serializers): ``ModelInfer`` reads
only the model name and version from the protobuf wire (fields 1 and 2 of
``ModelInferRequest``, without parsing the tensors), and when a policy sends
the request to another model or version it appends new values of those two
fields: protobuf's "last value wins" rule rewrites them without re-encoding
the message. Channels to the replicas are created once and reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.gateway.auth import AuthError, Principal
from inferstack.gateway.policies import Policy, Target
from inferstack.gateway.ratelimit import RateLimited
from inferstack.gateway.replicas import NoReplica, Replica
from inferstack.gateway.routing import Gateway, Result
from inferstack.gateway.shadow import decode_grpc_response, differs

log = logging.getLogger("inferstack.gateway.grpc")

SERVICE = "inference.GRPCInferenceService"
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
           429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
           504: grpc.StatusCode.DEADLINE_EXCEEDED}
#: gRPC code -> the HTTP status the routing core reasons with (503: retry elsewhere)
_HTTP_OF = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
            grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.FAILED_PRECONDITION: 400,
            grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.ALREADY_EXISTS: 409,
            grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401}
_FORWARD_METADATA = ("x-request-id", "traceparent", "tracestate")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_name_version(data: bytes) -> tuple[str, str]:
    """Fields 1 (model_name) and 2 (model_version) of a serialized request, walking the wire only."""
    name = version = b""
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _varint(data, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 2:
                length, pos = _varint(data, pos)
                if field == 1:
                    name = data[pos: pos + length]
                elif field == 2:
                    version = data[pos: pos + length]
                pos += length
            elif wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"wire type {wire}")
    except (IndexError, ValueError):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message") from None
    return name.decode("utf-8", "replace"), version.decode("utf-8", "replace")


def retarget(data: bytes, target: Target) -> bytes:
    """The request with model_name/model_version replaced (appended fields win when parsed)."""
    name = target.model.encode()
    version = target.version.encode()
    return b"".join((data, b"\x0a", _encode_varint(len(name)), name, b"\x12", _encode_varint(len(version)), version))


class GrpcProxy:
    def __init__(self, gateway: Gateway, max_message_bytes: int) -> None:
        self.gw = gateway
        self.options = [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes),
                        ("grpc.initial_reconnect_backoff_ms", 200),
                        ("grpc.min_reconnect_backoff_ms", 200),
                        ("grpc.max_reconnect_backoff_ms", 1000)]
        gateway.pool.on_remove.append(self._close_channel)

    # -- plumbing --------------------------------------------------------------------

    def _channel(self, replica: Replica) -> Any:
        if replica.grpc_channel is None:
            if not replica.spec.grpc:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"replica {replica.key} has no gRPC address")
            replica.grpc_channel = grpc.aio.insecure_channel(replica.spec.grpc, options=self.options)
        return replica.grpc_channel

    def _close_channel(self, replica: Replica) -> None:
        channel, replica.grpc_channel = replica.grpc_channel, None
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        for replica in list(self.gw.pool.replicas.values()):
            if replica.grpc_channel is not None:
                await replica.grpc_channel.close()
                replica.grpc_channel = None

    def handler(self) -> grpc.GenericRpcHandler:
        unary = {
            "ModelInfer": self.model_infer,
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self._per_model(pb.ModelMetadataRequest),
            "ModelConfig": self._per_model(pb.ModelConfigRequest),
            "ModelStatistics": self._per_model(pb.ModelStatisticsRequest),
            "RepositoryIndex": self.repository_index,
        }
        for name in ("RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
                     "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                     "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings"):
            unary[name] = self._unsupported(name)
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(self._wrap(fn)) for name, fn in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrap(self, fn: Any) -> Any:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await fn(request, context)
            except _Abort as exc:
                await context.abort(exc.code, exc.message)
            except NoReplica as exc:
                if exc.retry_after:
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
                await context.abort(_STATUS.get(exc.status, grpc.StatusCode.UNAVAILABLE), exc.message)
            raise AssertionError("unreachable")

        return call

    def _principal(self, context: grpc.aio.ServicerContext, model: str | None) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        gw = self.gw
        try:
            principal = gw.auth.authenticate(metadata.get("authorization"), metadata.get("x-api-key"))
            if model is not None:
                gw.auth.authorize(principal, model)
        except AuthError as exc:
            gw.metrics.auth_failures.labels(str(exc.status)).inc()
            raise _Abort(_STATUS[exc.status], exc.message) from None
        return principal

    def _limit(self, principal: Principal, context: grpc.aio.ServicerContext, model: str) -> None:
        try:
            self.gw.limiter.check(principal, context.peer() or "-", model)
        except RateLimited as exc:
            self.gw.metrics.rate_limited.labels(model, exc.scope).inc()
            context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message) from None

    async def _call(self, replica: Replica, method: str, data: bytes, metadata: tuple[tuple[str, str], ...],
                    timeout: float) -> Result:
        try:
            channel = self._channel(replica)
            response = await channel.unary_unary(f"/{SERVICE}/{method}")(data, metadata=metadata, timeout=timeout)
            return Result(200, response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Result(0, failure="timeout", timed_out=True, extra=exc)
            if code == grpc.StatusCode.UNAVAILABLE and _is_connect(exc):
                return Result(0, failure=exc.details() or "unavailable", connect_failure=True, extra=exc)
            return Result(_HTTP_OF.get(code, 500), extra=exc)

    def _metadata(self, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
        incoming = dict(context.invocation_metadata() or ())
        request_id = incoming.get("x-request-id") or f"gwg-{time.monotonic_ns():x}"
        out = [("x-request-id", request_id)]
        out += [(k, incoming[k]) for k in _FORWARD_METADATA[1:] if k in incoming]
        return tuple(out)

    async def _finish(self, result: Result, context: grpc.aio.ServicerContext) -> bytes:
        if result.status == 200 and result.failure is None:
            return result.body
        exc = result.extra
        if isinstance(exc, grpc.aio.AioRpcError):
            await context.abort(exc.code(), exc.details() or "")
        code = grpc.StatusCode.DEADLINE_EXCEEDED if result.timed_out else grpc.StatusCode.UNAVAILABLE
        await context.abort(code, f"replica failed: {result.failure}")
        raise AssertionError("unreachable")

    # -- inference -------------------------------------------------------------------

    async def _infer_one(self, data: bytes, context: grpc.aio.ServicerContext) -> tuple[bytes, str, Result | None]:
        gw = self.gw
        started = time.perf_counter()
        model, version = read_name_version(data)
        if not model:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        principal = self._principal(context, model)
        self._limit(principal, context, model)
        metadata = dict(context.invocation_metadata() or ())
        target, variant, policy = gw.resolve(model, version, metadata)
        body = data if (target.model == model and target.version == version) else retarget(data, target)
        forward = self._metadata(context)
        timeout = (policy.timeout_s if policy and policy.timeout_s else None) or gw.config.timeout_s

        async def call(replica: Replica) -> Result:
            return await self._call(replica, "ModelInfer", body, forward, timeout)

        try:
            result = await gw.send(target, call, model)
        except NoReplica as exc:
            gw.metrics.errors.labels(model, "no_replica" if exc.status == 503 else "not_found").inc()
            raise
        label = result.replica.label if result.replica else ""
        code = "200" if result.status == 200 and result.failure is None else str(result.status or 502)
        gw.metrics.done(model, variant, label, "grpc", code, time.perf_counter() - started)
        if variant:
            context.set_trailing_metadata((("x-inferstack-variant", variant), ("x-inferstack-replica", label)))
        if code == "200" and policy is not None and policy.shadow is not None and policy.shadow_hit():
            self._shadow(policy, model, data, forward, result, timeout)
        return await self._finish(result, context), variant, result

    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        response, _, _ = await self._infer_one(data, context)
        return response

    async def model_stream_infer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """Each streamed request is routed on its own; errors go in the stream's error_message."""
        async for data in requests:
            try:
                response, _, _ = await self._infer_stream_one(data, context)
                yield b"\x12" + _encode_varint(len(response)) + response
            except (_Abort, NoReplica) as exc:
                message = exc.message.encode()
                yield b"\x0a" + _encode_varint(len(message)) + message

    async def _infer_stream_one(self, data: bytes, context: grpc.aio.ServicerContext) -> tuple[bytes, str, Any]:
        gw = self.gw
        model, version = read_name_version(data)
        principal = self._principal(context, model)
        self._limit(principal, context, model)
        target, variant, _ = gw.resolve(model, version, dict(context.invocation_metadata() or ()))
        body = data if (target.model == model and target.version == version) else retarget(data, target)
        forward = self._metadata(context)

        async def call(replica: Replica) -> Result:
            return await self._call(replica, "ModelInfer", body, forward, gw.config.timeout_s)

        result = await gw.send(target, call, model)
        label = result.replica.label if result.replica else ""
        ok = result.status == 200 and result.failure is None
        gw.metrics.requests.labels(model, variant, label, "grpc", "200" if ok else str(result.status or 502)).inc()
        if not ok:
            exc = result.extra
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else f"replica failed: {result.failure}"
            raise _Abort(grpc.StatusCode.UNAVAILABLE, detail or "error")
        return result.body, variant, result

    def _shadow(self, policy: Policy, model: str, data: bytes, metadata: Any, primary: Result, timeout: float) -> None:
        assert policy.shadow is not None
        shadow = policy.shadow
        label = shadow.target.model + (f"/{shadow.target.version}" if shadow.target.version else "")
        gw = self.gw
        body = retarget(data, shadow.target)

        async def run() -> None:
            started = time.perf_counter()

            async def call(replica: Replica) -> Result:
                return await self._call(replica, "ModelInfer", body, metadata, timeout)

            try:
                result = await gw.send(shadow.target, call, model)
                if result.status != 200 or result.failure is not None:
                    gw.metrics.shadow.labels(model, label, "error").inc()
                    return
                gw.metrics.shadow_latency.labels(model, label).observe(time.perf_counter() - started)
                difference = differs(decode_grpc_response(primary.body), decode_grpc_response(result.body),
                                     shadow.atol, shadow.rtol)
                outcome = "match" if difference is None else "mismatch"
                gw.metrics.shadow.labels(model, label, outcome).inc()
                if difference is not None:
                    gw.metrics.shadow_mismatch.labels(model, label).inc()
                    log.info("shadow %s differs from the primary for %s: %s", label, model, difference)
            except Exception as exc:  # noqa: BLE001 - shadow failures never reach the client
                gw.metrics.shadow.labels(model, label, "error").inc()
                log.info("shadow request to %s failed: %s", label, exc)

        task = asyncio.get_running_loop().create_task(run())
        gw.shadow_tasks.add(task)
        task.add_done_callback(gw.shadow_tasks.discard)

    # -- the rest of the service -----------------------------------------------------

    async def server_live(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerReadyResponse(ready=self.gw.pool.ready() and not self.gw.draining).SerializeToString()

    async def server_metadata(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        from inferstack import __version__

        self._principal(context, None)
        return pb.ServerMetadataResponse(
            name="inferstack-gateway", version=__version__,
            extensions=["binary_tensor_data", "model_repository", "model_configuration", "statistics", "parameters"],
        ).SerializeToString()

    async def model_ready(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = pb.ModelReadyRequest.FromString(data)
        self._principal(context, request.name)
        policy = self.gw.policies.get(request.name)
        if policy is not None and not request.version:
            ready = any(self.gw.pool.model_ready(v.target) for v in policy.variants if v.weight > 0)
        else:
            ready = self.gw.pool.model_ready(Target(request.name, request.version))
        return pb.ModelReadyResponse(ready=ready).SerializeToString()

    async def repository_index(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = pb.RepositoryIndexRequest.FromString(data)
        principal = self._principal(context, None)
        response = pb.RepositoryIndexResponse()
        for row in self.gw.pool.merged_index(request.ready):
            if principal.may_use(row["name"]):
                response.models.add(name=row["name"], version=row.get("version", ""), state=row["state"])
        return response.SerializeToString()

    def _per_model(self, message: Any) -> Any:
        method = message.__name__[: -len("Request")]

        async def call_model(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            request = message.FromString(data)
            if not request.name:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{method} through the gateway needs a model name (statistics are per replica)")
            principal = self._principal(context, request.name)
            self._limit(principal, context, request.name)
            target, _, _ = self.gw.resolve(request.name, request.version, dict(context.invocation_metadata() or ()))
            forwarded = message(name=target.model, version=target.version).SerializeToString()
            metadata = self._metadata(context)

            async def call(replica: Replica) -> Result:
                return await self._call(replica, method, forwarded, metadata, self.gw.config.timeout_s)

            return await self._finish(await self.gw.send(target, call, request.name), context)

        return call_model

    def _unsupported(self, name: str) -> Any:
        async def refuse(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED,
                         f"{name} is not available through the gateway: use the replicas directly")

        return refuse


def _is_connect(exc: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the channel (cannot connect), as opposed to a replica's full queue."""
    lowered = ((exc.debug_error_string() or "") + (exc.details() or "")).lower()
    return "connect" in lowered or "failed to pick" in lowered


def create_grpc_server(proxy: GrpcProxy, host: str, port: int, *, max_message_bytes: int,
                       tls: tuple[str, str] | None = None) -> tuple[grpc.aio.Server, int]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((proxy.handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls:
        with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
            credentials = grpc.ssl_server_credentials(((key.read(), cert.read()),))
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, bound
