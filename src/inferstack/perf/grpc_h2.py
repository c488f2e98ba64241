"""A gRPC client made for load generation: unary calls on one HTTP/2 connection.

Why not grpc.aio: on the machine it measures, the load generator competes with
the server for cores, and a grpc.aio call costs its client about 200 µs of CPU
(docs/perf.md) — several times what the raw HTTP/1.1 client spends — so gRPC
measured with it looks slower than it is. This client sends pre-serialized
requests with a header block built once per method (no HPACK work per call),
writes every request of a loop iteration in one system call, and reads the
status from the trailers. It speaks gRPC over cleartext HTTP/2 (h2c), so it
works against any gRPC server (inferstack, Triton, grpcio); TLS is not supported.

It honours the server's flow-control windows, frame size and concurrent-stream
limit (calls over it wait), answers PINGs, and fails the calls in flight on
GOAWAY or a lost connection (the next call reconnects).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import hpack.exceptions

from inferstack.protocol.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    U32,
    WINDOW_UPDATE,
    HeaderBlockDecoder,
    frame,
    frame_head,
    hpack_literal,
    hpack_literal_indexed,
)

#: gRPC codes used here (grpc/doc/statuscodes.md).
UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE = 2, 4, 8, 13, 14
STATUS_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

_WINDOW = 8 * 1024 * 1024
_CONNECTION_WINDOW = 64 * 1024 * 1024


class GrpcCallError(Exception):
    """A call ended with a non-OK status (or the connection failed under it)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{STATUS_NAMES.get(code, code)}: {details}")
        self.code = code
        self.details = details


def _percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text)


class _Call:
    __slots__ = ("body", "future", "headers", "pending", "send_window", "stream_id")

    def __init__(self, future: asyncio.Future[bytes], stream_id: int, send_window: int) -> None:
        self.future = future
        self.stream_id = stream_id
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        #: Request bytes not yet sent (waiting for window).
        self.pending: memoryview | None = None
        self.send_window = send_window


class _Connection(asyncio.Protocol):
    """One HTTP/2 client connection."""

    def __init__(self, channel: GrpcH2Channel) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.next_stream_id = 1
        self.closed = False
        self.error = "connection closed"
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._out: list[bytes] | None = None
        self._decoder = HeaderBlockDecoder(1 << 20)
        self._header_call: _Call | None = None
        self._header_block = bytearray()
        self._header_end = False
        self._recv_unacked = 0
        self._peer_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._peer_max_streams = 1 << 31
        self._send_window = DEFAULT_WINDOW
        self._blocked: collections.OrderedDict[int, _Call] = collections.OrderedDict()
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = b"".join(SETTING.pack(k, v) for k, v in (
            (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, _WINDOW), (SETTINGS_MAX_FRAME_SIZE, 1 << 20),
        ))
        transport.write(  # type: ignore[attr-defined]
            PREFACE + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, U32.pack(_CONNECTION_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_all(UNAVAILABLE, f"connection lost: {exc}" if exc else self.error)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        size = len(buf)
        flush = self._out is None
        if flush:
            self._out = []
        view = memoryview(buf)
        try:
            while size - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                end = pos + 9 + length
                if end > size:
                    break
                frame_type, flags = buf[pos + 3], buf[pos + 4]
                stream_id = U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                start, pos = pos + 9, end
                if frame_type == DATA:
                    self._on_data(view, start, end, flags, stream_id)
                elif frame_type in (HEADERS, CONTINUATION):
                    self._on_headers(bytes(view[start:end]), frame_type, flags, stream_id)
                elif frame_type == WINDOW_UPDATE:
                    self._on_window_update(U32.unpack_from(buf, start)[0] & 0x7FFFFFFF, stream_id)
                elif frame_type == SETTINGS and not flags & ACK:
                    self._on_settings(bytes(view[start:end]))
                elif frame_type == PING and not flags & ACK:
                    self._write(frame(PING, ACK, 0, bytes(view[start:end])))
                elif frame_type == RST_STREAM:
                    code = U32.unpack_from(buf, start)[0]
                    self._finish(stream_id, GrpcCallError(UNAVAILABLE if code == 0x7 else INTERNAL,
                                                          f"stream reset by the server (HTTP/2 error {code})"))
                elif frame_type == GOAWAY:
                    last = U32.unpack_from(buf, start)[0] & 0x7FFFFFFF
                    self.closed = True
                    self.error = f"server sent GOAWAY (HTTP/2 error {U32.unpack_from(buf, start + 4)[0]})"
                    for sid in [s for s in self.calls if s > last]:
                        self._finish(sid, GrpcCallError(UNAVAILABLE, self.error))
        except (hpack.exceptions.HPACKError, ValueError) as error:
            self.error = f"bad response from the server: {error}"
            self.close()
        finally:
            view.release()
            del buf[:pos]
            if flush:
                self._write_out()

    # -- input --------------------------------------------------------------------------

    def _on_data(self, view: memoryview, start: int, end: int, flags: int, stream_id: int) -> None:
        length = end - start
        self._recv_unacked += length
        if self._recv_unacked >= _CONNECTION_WINDOW // 4:
            self._write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self._recv_unacked)))
            self._recv_unacked = 0
        if flags & PADDED:
            end -= view[start]
            start += 1
        call = self.calls.get(stream_id)
        if call is None:
            return
        call.body += view[start:end]
        if len(call.body) >= _WINDOW // 2 and not flags & END_STREAM:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, U32.pack(len(call.body))))
        if flags & END_STREAM:
            self._complete(call)

    def _on_headers(self, payload: bytes, frame_type: int, flags: int, stream_id: int) -> None:
        if frame_type == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._header_call = self.calls.get(stream_id)
            self._header_block = bytearray(payload)
            self._header_end = bool(flags & END_STREAM)
        else:
            self._header_block += payload
        if not flags & END_HEADERS:
            return
        headers = self._decoder.decode(bytes(self._header_block))  # always: keeps the table in step
        call = self._header_call
        self._header_call = None
        if call is None:
            return
        call.headers.extend(headers)
        if self._header_end:
            self._complete(call)

    def _on_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self._peer_window
                self._peer_window = value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
        self._write(frame(SETTINGS, ACK, 0))
        if not self.ready.done():
            self.ready.set_result(None)
        self._flush_blocked()
        self._wake_slot_waiters()

    def _on_window_update(self, increment: int, stream_id: int) -> None:
        if stream_id == 0:
            self._send_window += increment
            self._flush_blocked()
        elif (call := self.calls.get(stream_id)) is not None:
            call.send_window += increment
            if call.pending is not None:
                self._send_pending(call)

    def _complete(self, call: _Call) -> None:
        status, message, http_status = None, "", None
        for name, value in call.headers:
            if name == "grpc-status":
                status = value
            elif name == "grpc-message":
                message = _percent_decode(value)
            elif name == ":status":
                http_status = value
        if status is None:
            error = GrpcCallError(UNKNOWN if http_status == "200" else UNAVAILABLE,
                                  f"no grpc-status in the response (HTTP status {http_status})")
            self._finish(call.stream_id, error)
        elif status != "0":
            self._finish(call.stream_id, GrpcCallError(int(status) if status.isdigit() else UNKNOWN, message))
        elif len(call.body) < 5:
            self._finish(call.stream_id, GrpcCallError(INTERNAL, "OK status without a response message"))
        else:
            if call.body[0]:
                self._finish(call.stream_id, GrpcCallError(INTERNAL, "compressed responses are not supported"))
            else:
                self._finish(call.stream_id, bytes(memoryview(call.body)[5:]))

    def _finish(self, stream_id: int, result: bytes | BaseException) -> None:
        call = self.calls.pop(stream_id, None)
        if call is None:
            return
        self._blocked.pop(stream_id, None)
        if not call.future.done():
            if isinstance(result, BaseException):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)
        self._wake_slot_waiters()

    # -- output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self.transport is not None:
            self._out = [data]
            asyncio.get_running_loop().call_soon(self._write_out)

    def _write_out(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    async def start_call(self, head: bytes, message: bytes, timeout: float | None) -> bytes:
        """Open a stream, send the request, wait for the response message."""
        while len(self.calls) >= self._peer_max_streams and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            await waiter
        if self.closed or self.transport is None:
            raise GrpcCallError(UNAVAILABLE, self.error)
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        call = _Call(future, stream_id, self._peer_window)
        self.calls[stream_id] = call
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        self._write(frame(HEADERS, END_HEADERS, stream_id, head))
        call.pending = memoryview(body)
        self._send_pending(call)
        if timeout is None:
            return await future
        timer = asyncio.get_running_loop().call_later(timeout, self.cancel, stream_id, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    def _send_pending(self, call: _Call) -> None:
        data = call.pending
        assert data is not None
        while True:
            allowed = max(0, min(len(data), call.send_window, self._send_window, self._peer_max_frame))
            if allowed == 0 and len(data):
                self._blocked[call.stream_id] = call
                call.pending = data
                return
            last = allowed == len(data)
            self._write(frame_head(DATA, END_STREAM if last else 0, call.stream_id, allowed) + bytes(data[:allowed]))
            call.send_window -= allowed
            self._send_window -= allowed
            data = data[allowed:]
            if last:
                call.pending = None
                self._blocked.pop(call.stream_id, None)
                return

    def _flush_blocked(self) -> None:
        for call in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self._send_pending(call)

    def _wake_slot_waiters(self) -> None:
        while self._slot_waiters and (len(self.calls) < self._peer_max_streams or self.closed):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def cancel(self, stream_id: int, timeout: float) -> None:
        """Abandon a call past its timeout: RST_STREAM CANCEL."""
        if stream_id in self.calls:
            self._write(frame(RST_STREAM, 0, stream_id, U32.pack(0x8)))
            self._finish(stream_id, GrpcCallError(DEADLINE_EXCEEDED, f"no answer within {timeout:g} s"))

    def _fail_all(self, code: int, message: str) -> None:
        self.closed = True
        for stream_id in list(self.calls):
            self._finish(stream_id, GrpcCallError(code, message))
        if not self.ready.done():
            self.ready.set_exception(GrpcCallError(code, message))
        self._wake_slot_waiters()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class GrpcH2Channel:
    """Unary gRPC calls to ``host:port`` over one HTTP/2 connection (reconnected when lost)."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.authority = (f"[{host}]" if ":" in host else host) + f":{port}"
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._heads: dict[str, bytes] = {}

    def _head(self, path: str) -> bytes:
        """The request header block for ``path``: static-table indexes and literals, built once."""
        head = self._heads.get(path)
        if head is None:
            head = (
                b"\x83\x86"  # :method POST, :scheme http (static entries 3 and 6)
                + hpack_literal_indexed(4, path.encode())  # :path
                + hpack_literal_indexed(1, self.authority.encode())  # :authority
                + hpack_literal_indexed(31, b"application/grpc")  # content-type
                + hpack_literal(b"te", b"trailers")
                + hpack_literal_indexed(58, b"inferstack-perf")  # user-agent
            )
            self._heads[path] = head
        return head

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:  # one connect for every caller waiting on it
            if self._conn is not None and not self._conn.closed:
                return self._conn
            loop = asyncio.get_running_loop()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: _Connection(self), self.host, self.port), self.connect_timeout
                )
                await asyncio.wait_for(conn.ready, self.connect_timeout)
            except (TimeoutError, OSError) as error:
                raise GrpcCallError(UNAVAILABLE, f"cannot connect to {self.authority}: "
                                                 f"{error or type(error).__name__}") from None
            self._conn = conn
            return conn

    async def unary(self, path: str, message: bytes, timeout: float | None = None) -> bytes:
        """One unary call: serialized request in, serialized response out; GrpcCallError otherwise."""
        conn = await self._connection()
        return await conn.start_call(self._head(path), message, timeout)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)

