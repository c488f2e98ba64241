"""gRPC (the wire protocol, not the ``grpcio`` library) over our own HTTP/2.

``inferstack serve``'s default gRPC server. It serves the same
``GrpcService`` servicer as the ``grpc.aio`` server (``--grpc-server grpcio``)
and looks the same on the wire, so ``tritonclient.grpc`` and any other gRPC
client work unchanged; it exists because ``grpc.aio`` spends more CPU per call
than inferstack's whole HTTP request (docs/performance.md, "The gRPC floor").

What it does per call, following the gRPC over HTTP/2 spec
(grpc/doc/PROTOCOL-HTTP2.md):

- ``:path`` picks the method from the service descriptor; an unknown one is
  ``UNIMPLEMENTED``. Non-gRPC content types get HTTP 415.
- ``grpc-timeout`` becomes a deadline: the handler is cancelled when it passes
  (its request leaves the queue) and the call ends ``DEADLINE_EXCEEDED``.
- Messages are length-prefixed; ``gzip`` and ``deflate`` compressed requests are
  inflated (bounded, so a small compressed message cannot grow past the limit).
  A message over ``max_message_bytes``, received or sent, is ``RESOURCE_EXHAUSTED``.
- Unary calls answer headers, message and trailers in one write; streaming calls
  (``ModelStreamInfer``) send each message as it is yielded, waiting for the
  peer's flow-control window.
- A client's RST_STREAM or a lost connection cancels the handler.

Handlers get a small ``ServicerContext``-like object (``abort``,
``invocation_metadata``, ``peer``, ``time_remaining``, ``cancelled``,
``set_code``/``set_details``/``set_trailing_metadata``), which is all the
servicer uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import operator
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.protocol.http2 import STATUS_200, hpack_literal
from inferstack.transports.http2 import Http2Connection, Stream
from inferstack.transports.sockets import reuse_port_socket

log = logging.getLogger("inferstack.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"

# gRPC status codes (grpc/doc/statuscodes.md).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

ACCEPT_ENCODING = b"identity,deflate,gzip"
RESPONSE_HEAD = (
    STATUS_200
    + hpack_literal(b"content-type", b"application/grpc")
    + hpack_literal(b"grpc-accept-encoding", ACCEPT_ENCODING)
)
TRAILERS_OK = hpack_literal(b"grpc-status", b"0")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_RESERVED_HEADERS = frozenset({"te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


def _percent_encode(message: str) -> bytes:
    """grpc-message's encoding: printable ASCII except '%' as is, the rest %XX of UTF-8."""
    raw = message.encode("utf-8", "replace")
    return b"".join(
        bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in raw
    )


def status_block(code: int, message: str = "", trailing: tuple[tuple[str, Any], ...] = (), *,
                 trailers_only: bool) -> bytes:
    """The trailers of a call; with ``trailers_only`` also the response head (no message sent)."""
    block = RESPONSE_HEAD if trailers_only else b""
    block += hpack_literal(b"grpc-status", str(code).encode())
    if message:
        block += hpack_literal(b"grpc-message", _percent_encode(message))
    for key, value in trailing:
        if key.endswith("-bin"):
            value = base64.b64encode(value).rstrip(b"=")
        elif isinstance(value, str):
            value = value.encode()
        block += hpack_literal(key.lower().encode(), value)
    return block


def _status_int(code: Any) -> int:
    """``grpc.StatusCode.NOT_FOUND`` (whose value is ``(5, 'not found')``) or a plain int."""
    value = getattr(code, "value", code)
    return int(value[0] if isinstance(value, tuple) else value)


def _parse_timeout(value: str) -> float | None:
    if len(value) < 2 or value[-1] not in _TIMEOUT_UNITS or not value[:-1].isdigit() or len(value) > 9:
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


class Abort(Exception):
    """Raised by ``abort``: ends the call with this status."""

    def __init__(self, code: int, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing


class _CallError(Exception):
    """A protocol-level failure found while reading the request (size, compression)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Method:
    """One RPC of the service: how to parse its request and which handler runs it."""

    __slots__ = ("client_streaming", "handler", "name", "parse", "serialize", "server_streaming")

    def __init__(self, name: str, parse: Callable[[Any], Any], handler: Callable[..., Any],
                 client_streaming: bool = False, server_streaming: bool = False,
                 serialize: Callable[[Any], bytes] = operator.methodcaller("SerializeToString")) -> None:
        self.name = name
        #: bytes-like → request object (a message class's ``FromString``).
        self.parse = parse
        self.serialize = serialize
        self.handler = handler
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming


def service_methods(servicer: Any) -> dict[str, Method]:
    """``/inference.GRPCInferenceService/<Name>`` → Method, from the proto descriptor."""
    descriptor = pb.DESCRIPTOR.services_by_name[SERVICE_NAME.split(".")[-1]]
    methods = {}
    for method in descriptor.methods:
        request_class = getattr(pb, method.input_type.name)
        methods[f"/{SERVICE_NAME}/{method.name}"] = Method(
            method.name, request_class.FromString, getattr(servicer, method.name),
            method.client_streaming, method.server_streaming,
        )
    return methods


class Call:
    """One gRPC call's state; also the handler's ``context``."""

    __slots__ = (
        "_server",
        "code",
        "conn",
        "deadline",
        "details",
        "encoding",
        "expired",
        "finished",
        "gone",
        "metadata",
        "method",
        "requests",
        "stream",
        "task",
        "timer",
        "trailing",
    )

    def __init__(self, server: GrpcH2Server, conn: Http2Connection, stream: Stream, method: Method,
                 metadata: list[tuple[str, Any]], encoding: str | None, timeout: float | None) -> None:
        self._server = server
        self.conn = conn
        self.stream = stream
        self.method = method
        self.metadata = metadata
        self.encoding = encoding
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False
        self.requests: asyncio.Queue[Any] | None = None
        self.code: int | None = None
        self.details = ""
        self.trailing: tuple[tuple[str, Any], ...] = ()
        self.finished = False
        #: The client reset the stream or the connection was lost.
        self.gone = False

    # -- the ServicerContext surface ------------------------------------------------------

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise Abort(_status_int(code), details, tuple(trailing_metadata or ()))

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return tuple(self.metadata)

    def peer(self) -> str:
        return self.conn.peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def cancelled(self) -> bool:
        """True once the client reset the call or went away (or its deadline passed)."""
        return self.gone or self.expired

    def done(self) -> bool:
        return self.finished

    def set_code(self, code: Any) -> None:
        self.code = _status_int(code)

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = tuple(metadata or ())


class GrpcH2Server:
    """Serves one servicer's methods on ``host:port`` over HTTP/2 cleartext (h2c)."""

    def __init__(self, servicer: Any, host: str, port: int, *, max_message_bytes: int,
                 reuse_port: bool = False, max_concurrent_streams: int = 1024,
                 methods: dict[str, Method] | None = None) -> None:
        #: ``:path`` → Method; the KServe v2 service's methods unless given.
        self.methods = methods if methods is not None else service_methods(servicer)
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.reuse_port = reuse_port
        self.max_concurrent_streams = max_concurrent_streams
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Http2Connection] = set()
        self._all_closed: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        if self.reuse_port:
            sock = reuse_port_socket(self.host, self.port)
            self._server = await loop.create_server(self._protocol, sock=sock, backlog=2048)
        else:
            self._server = await loop.create_server(
                self._protocol, self.host, self.port, reuse_address=True, backlog=2048
            )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _protocol(self) -> Http2Connection:
        conn = Http2Connection(self, max_concurrent_streams=self.max_concurrent_streams, on_close=self._closed)
        self._connections.add(conn)
        if self._all_closed is not None:
            self._all_closed.clear()
        return conn

    def _closed(self, conn: Http2Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; running calls get ``grace`` seconds, then are cancelled."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.goaway()
        if grace and self._all_closed is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self._connections):
            for stream in list(conn.streams.values()):
                call = stream.app
                if isinstance(call, Call) and call.task is not None:
                    call.task.cancel()
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # -- StreamHandler --------------------------------------------------------------------

    def headers_received(self, conn: Http2Connection, stream: Stream, end_stream: bool) -> None:
        path = method_name = content_type = timeout = encoding = None
        metadata: list[tuple[str, Any]] = []
        for name, value in stream.headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method_name = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = value
            elif name == "grpc-encoding":
                encoding = value
            elif name not in _RESERVED_HEADERS:
                if name.endswith("-bin"):
                    with contextlib.suppress(ValueError):
                        metadata.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
                else:
                    metadata.append((name, value))
        if content_type is None or not content_type.startswith("application/grpc") or method_name != "POST":
            conn.send_headers(stream, b"\x08\x03415", True)  # :status (static name 8) 415
            return
        method = self.methods.get(path or "")
        if method is None:
            self._trailers_only(conn, stream, UNIMPLEMENTED, f"unknown method {path}")
            return
        if encoding in ("identity", ""):
            encoding = None
        if encoding is not None and encoding not in ("gzip", "deflate"):
            self._trailers_only(conn, stream, UNIMPLEMENTED,
                                f"message encoding {encoding!r} is not supported (identity, deflate, gzip)")
            return
        seconds = None
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is None:
                self._trailers_only(conn, stream, INTERNAL, f"malformed grpc-timeout {timeout!r}")
                return
        call = Call(self, conn, stream, method, metadata, encoding, seconds)
        stream.app = call
        if method.client_streaming:
            call.requests = asyncio.Queue()
            self._start(call, self._run(call, self._request_iterator(call)))
            if end_stream:
                call.requests.put_nowait(None)
        elif end_stream:
            self._trailers_only(conn, stream, INTERNAL, "request message missing")

    def data_received(self, conn: Http2Connection, stream: Stream, end_stream: bool) -> None:
        call = stream.app
        if not isinstance(call, Call) or call.finished:
            stream.body.clear()
            return
        try:
            if call.method.client_streaming:
                assert call.requests is not None
                for message in self._take_messages(call, stream.body):
                    call.requests.put_nowait(message)
                if end_stream:
                    if stream.body:
                        raise _CallError(INTERNAL, "request ended inside a message")
                    call.requests.put_nowait(None)
                return
            if self._message_too_large(stream.body):
                raise _CallError(*self._too_large(stream.body))
            if not end_stream:
                return
            messages = self._take_messages(call, stream.body)
            if len(messages) != 1 or stream.body:
                raise _CallError(INTERNAL, f"a unary call needs exactly one request message, got {len(messages)}")
            self._start(call, self._run(call, messages[0]))
        except _CallError as error:
            self._fail(call, error.code, error.details)

    def stream_reset(self, conn: Http2Connection, stream: Stream) -> None:
        call = stream.app
        if isinstance(call, Call):
            self._abandon(call)

    def connection_lost(self, conn: Http2Connection) -> None:
        for stream in list(conn.streams.values()):
            call = stream.app
            if isinstance(call, Call):
                self._abandon(call)

    # -- calls ----------------------------------------------------------------------------

    def _start(self, call: Call, work: Any) -> None:
        call.task = asyncio.get_running_loop().create_task(work)
        if call.deadline is not None:
            call.timer = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + max(0.0, call.deadline - time.monotonic()),
                self._expire, call,
            )

    def _expire(self, call: Call) -> None:
        if not call.finished and call.task is not None:
            call.expired = True
            call.task.cancel()

    def _abandon(self, call: Call) -> None:
        """The client is gone (reset or disconnect): cancel the handler, send nothing."""
        call.finished = call.gone = True
        if call.timer is not None:
            call.timer.cancel()
        if call.task is not None and not call.task.done():
            call.task.cancel()
        if call.requests is not None:
            call.requests.put_nowait(None)

    def _message_too_large(self, body: bytearray) -> bool:
        return len(body) >= 5 and int.from_bytes(body[1:5], "big") > self.max_message_bytes

    def _too_large(self, body: bytearray | int) -> tuple[int, str]:
        size = body if isinstance(body, int) else int.from_bytes(body[1:5], "big")
        return RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {self.max_message_bytes})"

    def _take_messages(self, call: Call, body: bytearray) -> list[Any]:
        """Parse and remove the complete length-prefixed messages at the front of ``body``.

        Parsed straight from a view of the buffer: protobuf copies what it keeps.
        """
        messages = []
        offset = 0
        with memoryview(body) as view:
            while len(body) - offset >= 5:
                size = int.from_bytes(view[offset + 1 : offset + 5], "big")
                if size > self.max_message_bytes:
                    raise _CallError(*self._too_large(size))
                if len(body) - offset - 5 < size:
                    break
                compressed = body[offset]
                payload: Any = view[offset + 5 : offset + 5 + size]
                offset += 5 + size
                try:  # (``finally`` drops the view: an error's traceback must not keep ``body`` exported)
                    if compressed:
                        payload = self._inflate(call, bytes(payload))
                    messages.append(call.method.parse(payload))
                except DecodeError as error:
                    raise _CallError(INTERNAL, f"cannot parse the request message: {error}") from None
                finally:
                    del payload
        if offset:
            del body[:offset]
        return messages

    def _inflate(self, call: Call, payload: bytes) -> bytes:
        if call.encoding is None:
            raise _CallError(INTERNAL, "compressed message without a grpc-encoding header")
        inflater = zlib.decompressobj(31 if call.encoding == "gzip" else 15)
        try:
            out = inflater.decompress(payload, self.max_message_bytes + 1)
        except zlib.error as error:
            raise _CallError(INTERNAL, f"cannot decompress the {call.encoding} message: {error}") from None
        if len(out) > self.max_message_bytes or inflater.unconsumed_tail:
            raise _CallError(RESOURCE_EXHAUSTED,
                             f"decompressed message larger than max (over {self.max_message_bytes} bytes)")
        return out

    async def _request_iterator(self, call: Call) -> AsyncIterator[Any]:
        assert call.requests is not None
        while (request := await call.requests.get()) is not None:
            yield request

    async def _run(self, call: Call, request: Any) -> None:
        """Run the handler and answer: message(s), then the status."""
        conn, stream, method = call.conn, call.stream, call.method
        head_sent = False
        code, details, trailing = OK, "", ()
        try:
            result = method.handler(request, call)
            if method.server_streaming:
                async for response in result:
                    body = method.serialize(response)
                    if len(body) > self.max_message_bytes:
                        raise Abort(RESOURCE_EXHAUSTED,
                                    f"Sent message larger than max ({len(body)} vs. {self.max_message_bytes})")
                    if not head_sent:
                        conn.send_headers(stream, RESPONSE_HEAD, False)
                        head_sent = True
                    conn.send_data(stream, b"\x00" + len(body).to_bytes(4, "big") + body, False)
                    await conn.drain(stream)
            else:
                response = await result
                body = method.serialize(response)
                if len(body) > self.max_message_bytes:
                    raise Abort(RESOURCE_EXHAUSTED,
                                f"Sent message larger than max ({len(body)} vs. {self.max_message_bytes})")
                if call.finished:
                    return
                if call.code in (None, OK) and not call.trailing:
                    self._done(call)
                    conn.send_response(stream, RESPONSE_HEAD, b"\x00" + len(body).to_bytes(4, "big") + body,
                                       TRAILERS_OK)
                    return
                conn.send_headers(stream, RESPONSE_HEAD, False)
                head_sent = True
                conn.send_data(stream, b"\x00" + len(body).to_bytes(4, "big") + body, False)
            code, details, trailing = call.code or OK, call.details, call.trailing
        except Abort as abort:
            code, details, trailing = abort.code, abort.details, abort.trailing
        except asyncio.CancelledError:
            if not call.expired:
                return  # the client went away, or the server is stopping
            code, details = DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception:
            log.exception("gRPC %s failed", method.name)
            code, details = UNKNOWN, "internal server error; see the server log"
        if call.finished:
            return
        self._done(call)
        conn.send_headers(stream, status_block(code, details, trailing, trailers_only=not head_sent), True)

    def _done(self, call: Call) -> None:
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()

    def _fail(self, call: Call, code: int, details: str) -> None:
        """End a call before its handler ran (or while it reads a stream)."""
        log.info("gRPC %s: %s", call.method.name, details)
        if call.task is not None and not call.task.done():
            call.task.cancel()
        self._done(call)
        call.stream.body.clear()
        if call.requests is not None:
            call.requests.put_nowait(None)
        self._trailers_only(call.conn, call.stream, code, details)

    def _trailers_only(self, conn: Http2Connection, stream: Stream, code: int, details: str) -> None:
        conn.send_headers(stream, status_block(code, details, trailers_only=True), True)
