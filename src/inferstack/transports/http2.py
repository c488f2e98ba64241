"""A small server side of HTTP/2 (RFC 9113), made for gRPC's traffic.

Why our own: a unary gRPC call through ``grpc.aio`` costs about as much server
CPU as inferstack's whole HTTP/1.1 request, before any model code runs
(``benchmarks/bench_grpc_floor.py``): the C core hands every event from its
poller thread to the event loop, with several system calls per call. gRPC on
the wire is plain HTTP/2, and the part a server needs is small: frames, HPACK
header decoding (the ``hpack`` library), flow control, and writing the
response's three pieces (headers, data, trailers) in one ``write``.

This module knows nothing about gRPC. A connection parses frames, keeps the
streams' state and both directions' flow-control windows, and reports to an
application object (``StreamHandler``) when a stream's headers are complete,
when body bytes arrive (in ``Stream.body``, copied once from the socket's
buffer) and when a stream is reset. The application answers with
``send_headers``/``send_data``, which go out at once when the peer's windows
allow and otherwise wait in the stream's queue until a WINDOW_UPDATE.

Server push, priorities and HTTP/1.1 upgrade are not supported (gRPC uses none
of them); the dynamic HPACK table is never used for what we send.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

import hpack.exceptions

from inferstack.protocol.http2 import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    TABLE_SIZE_ZERO,
    U32,
    WINDOW_UPDATE,
    HeaderBlockDecoder,
    frame,
    frame_head,
)

log = logging.getLogger("inferstack.http2")

class Stream:
    """One HTTP/2 stream: request headers, buffered body, send window and queue."""

    __slots__ = (
        "app",
        "body",
        "drained",
        "headers",
        "id",
        "local_closed",
        "pending",
        "recv_unacked",
        "remote_closed",
        "send_window",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] = []
        #: Request body bytes received and not yet consumed by the application.
        self.body = bytearray()
        self.remote_closed = False
        self.local_closed = False
        self.send_window = send_window
        self.recv_unacked = 0
        #: Output waiting for flow-control window: [is_data, bytes/memoryview, end_stream].
        self.pending: collections.deque[list[Any]] = collections.deque()
        #: Resolved when ``pending`` empties (backpressure for streaming senders).
        self.drained: asyncio.Future[None] | None = None
        #: The application's per-stream state.
        self.app: Any = None


class StreamHandler(Protocol):
    """What a connection tells the application."""

    def headers_received(self, conn: Http2Connection, stream: Stream, end_stream: bool) -> None: ...

    def data_received(self, conn: Http2Connection, stream: Stream, end_stream: bool) -> None: ...

    def stream_reset(self, conn: Http2Connection, stream: Stream) -> None: ...

    def connection_lost(self, conn: Http2Connection) -> None: ...


class ConnectionError_(Exception):
    """A connection error (section 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Http2Connection(asyncio.Protocol):
    """The server end of one HTTP/2 connection."""

    def __init__(
        self,
        handler: StreamHandler,
        *,
        max_concurrent_streams: int = 1000,
        initial_window: int = 8 * 1024 * 1024,
        connection_window: int = 64 * 1024 * 1024,
        max_frame_size: int = 1024 * 1024,
        max_header_list_size: int = 64 * 1024,
        on_close: Any = None,
    ) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.closing = False
        self._on_close = on_close
        self._buf = bytearray()
        self._preface_seen = False
        self._decoder = HeaderBlockDecoder(max_header_list_size)
        self._header_stream: Stream | None = None  # a header block continued in CONTINUATION frames
        self._header_end_stream = False
        self._header_block = bytearray()
        self._first_headers_sent = False
        # Our receive side.
        self._max_streams = max_concurrent_streams
        self._initial_window = initial_window
        self._connection_window = connection_window
        self._max_frame_local = max_frame_size
        self._recv_unacked = 0
        # The peer's receive side (what we may send).
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._send_window = DEFAULT_WINDOW
        self._blocked: dict[int, Stream] = {}
        # Writes made while frames are being processed go out together.
        self._out: list[bytes] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = peer[0]
            self.peer = f"ipv6:[{host}]:{peer[1]}" if ":" in host else f"ipv4:{host}:{peer[1]}"
        settings = b"".join(
            SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, self._max_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, self._initial_window),
                (SETTINGS_MAX_FRAME_SIZE, self._max_frame_local),
                (SETTINGS_MAX_HEADER_LIST_SIZE, self._decoder.max_header_list_size),
            )
        )
        out = frame(SETTINGS, 0, 0, settings)
        if self._connection_window > DEFAULT_WINDOW:
            out += frame(WINDOW_UPDATE, 0, 0, U32.pack(self._connection_window - DEFAULT_WINDOW))
        transport.write(out)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        flush = self._out is None  # else a flush is already scheduled
        if flush:
            self._out = []
        try:
            if not self._preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                del buf[: len(PREFACE)]
                self._preface_seen = True
            self._process_frames()
        except ConnectionError_ as error:
            self._goaway_and_close(error.code, str(error))
        finally:
            if flush:
                self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        for stream in self._blocked.values():
            _resolve(stream)
        self._blocked.clear()
        try:
            self.handler.connection_lost(self)
        finally:
            self.streams.clear()
            if self._on_close is not None:
                self._on_close(self)

    # -- frames in ----------------------------------------------------------------------

    def _process_frames(self) -> None:
        buf = self._buf
        size = len(buf)
        pos = 0
        view = memoryview(buf)
        try:
            while size - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if length > self._max_frame_local:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes over SETTINGS_MAX_FRAME_SIZE")
                end = pos + 9 + length
                if end > size:
                    break
                frame_type = buf[pos + 3]
                flags = buf[pos + 4]
                stream_id = U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                start = pos + 9
                pos = end
                if self._header_stream is not None and frame_type != CONTINUATION:
                    raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted by another frame")
                if frame_type == DATA:
                    self._on_data(view, start, end, flags, stream_id)
                elif frame_type == HEADERS:
                    self._on_headers(bytes(view[start:end]), flags, stream_id)
                elif frame_type == CONTINUATION:
                    self._on_continuation(bytes(view[start:end]), flags, stream_id)
                elif frame_type == WINDOW_UPDATE:
                    self._on_window_update(bytes(view[start:end]), stream_id)
                elif frame_type == PING:
                    if length != 8:
                        raise ConnectionError_(FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
                    if not flags & ACK:
                        self._write(frame(PING, ACK, 0, bytes(view[start:end])))
                elif frame_type == SETTINGS:
                    self._on_settings(bytes(view[start:end]), flags, stream_id)
                elif frame_type == RST_STREAM:
                    self._on_rst_stream(stream_id)
                elif frame_type == GOAWAY:
                    self.closing = True
                elif frame_type == PUSH_PROMISE:
                    raise ConnectionError_(PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")
                # PRIORITY and unknown frame types are ignored (section 5.5).
        finally:
            view.release()
            del buf[:pos]

    def _on_data(self, view: memoryview, start: int, end: int, flags: int, stream_id: int) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        length = end - start
        self._recv_unacked += length
        if self._recv_unacked >= self._connection_window // 4:
            self._write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self._recv_unacked)))
            self._recv_unacked = 0
        if flags & PADDED:
            if length < 1 or view[start] >= length:
                raise ConnectionError_(PROTOCOL_ERROR, "bad DATA padding")
            end -= view[start]
            start += 1
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we already closed or reset: dropped
        stream.body += view[start:end]
        end_stream = bool(flags & END_STREAM)
        if end_stream:
            stream.remote_closed = True
        else:
            stream.recv_unacked += length
            if stream.recv_unacked >= self._initial_window // 2:
                self._write(frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.recv_unacked)))
                stream.recv_unacked = 0
        self.handler.data_received(self, stream, end_stream)
        self._maybe_forget(stream)

    def _on_headers(self, payload: bytes, flags: int, stream_id: int) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            pad = payload[0] if payload else 256
            if pad >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "bad HEADERS padding")
            payload = payload[1 : len(payload) - pad]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id % 2 == 0 or stream_id <= self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order")
            self.last_stream_id = stream_id
            stream = Stream(stream_id, self._peer_initial_window)
        self._header_block = bytearray(payload)
        self._header_end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._headers_complete(stream)
        else:
            self._header_stream = stream

    def _on_continuation(self, payload: bytes, flags: int, stream_id: int) -> None:
        stream = self._header_stream
        if stream is None or stream.id != stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._header_block += payload
        if len(self._header_block) > 4 * self._decoder.max_header_list_size:
            raise ConnectionError_(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            self._header_stream = None
            self._headers_complete(stream)

    def _headers_complete(self, stream: Stream) -> None:
        try:
            headers = self._decoder.decode(bytes(self._header_block))
        except hpack.exceptions.OversizedHeaderListError as error:
            # The decoder's state is intact: refuse this stream only.
            if stream.id not in self.streams:
                self._write(frame(RST_STREAM, 0, stream.id, U32.pack(REFUSED_STREAM)))
            log.info("HTTP/2 stream %d refused: %s", stream.id, error)
            return
        except hpack.exceptions.HPACKError as error:
            raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {error}") from None
        end_stream = self._header_end_stream
        if stream.id in self.streams:  # trailers
            if not end_stream:
                raise ConnectionError_(PROTOCOL_ERROR, "a second header block must end the stream")
            stream.remote_closed = True
            self.handler.data_received(self, stream, True)
            self._maybe_forget(stream)
            return
        if self.closing:
            self._write(frame(RST_STREAM, 0, stream.id, U32.pack(REFUSED_STREAM)))
            return
        if len(self.streams) >= self._max_streams:
            self._write(frame(RST_STREAM, 0, stream.id, U32.pack(REFUSED_STREAM)))
            return
        stream.headers = headers  # type: ignore[assignment]
        stream.remote_closed = end_stream
        self.streams[stream.id] = stream
        self.handler.headers_received(self, stream, end_stream)
        self._maybe_forget(stream)

    def _on_settings(self, payload: bytes, flags: int, stream_id: int) -> None:
        if stream_id != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: we never index what we send (and announce a table of 0).
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _on_window_update(self, payload: bytes, stream_id: int) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload must be 4 bytes")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if increment == 0:
            self.reset(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self.reset(stream, FLOW_CONTROL_ERROR)
            return
        if stream.pending:
            self._flush(stream)

    def _on_rst_stream(self, stream_id: int) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.remote_closed = stream.local_closed = True
        stream.pending.clear()
        self._blocked.pop(stream_id, None)
        _resolve(stream)
        self.handler.stream_reset(self, stream)

    # -- frames out ---------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Queue output; it goes out in one write at the end of this loop iteration.

        Responses finished together (a batch) share one system call, and frames
        made while input is processed go out with the rest.
        """
        if self._out is not None:
            self._out.append(data)
        elif self.transport is not None:
            self._out = [data]
            asyncio.get_running_loop().call_soon(self._write_out)

    def _write_out(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def header_frames(self, stream: Stream, block: bytes, end_stream: bool) -> bytes:
        """HEADERS (+ CONTINUATION) frames carrying ``block``."""
        if not self._first_headers_sent:
            self._first_headers_sent = True
            block = TABLE_SIZE_ZERO + block
        flags = END_STREAM if end_stream else 0
        limit = self._peer_max_frame
        if len(block) <= limit:
            return frame(HEADERS, flags | END_HEADERS, stream.id, block)
        parts = [block[i : i + limit] for i in range(0, len(block), limit)]
        out = [frame(HEADERS, flags, stream.id, parts[0])]
        for index, part in enumerate(parts[1:], start=1):
            out.append(frame(CONTINUATION, END_HEADERS if index == len(parts) - 1 else 0, stream.id, part))
        return b"".join(out)

    def send_response(self, stream: Stream, head: bytes, body: bytes, trailers: bytes) -> None:
        """Headers, one body and trailers: a single write when the windows allow it."""
        if stream.local_closed or self.transport is None:
            return
        size = len(body)
        if (
            not stream.pending
            and size <= self._peer_max_frame
            and size <= stream.send_window
            and size <= self._send_window
        ):
            stream.send_window -= size
            self._send_window -= size
            stream.local_closed = True
            self._write(
                self.header_frames(stream, head, False)
                + frame_head(DATA, 0, stream.id, size) + body
                + self.header_frames(stream, trailers, True)
            )
            self._finish_local(stream)
            return
        self.send_headers(stream, head, False)
        self.send_data(stream, body, False)
        self.send_headers(stream, trailers, True)

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        if stream.local_closed or self.transport is None:
            return
        if stream.pending:  # keep order behind queued DATA
            stream.pending.append([False, block, end_stream])
            if end_stream:
                stream.local_closed = True
            return
        self._write(self.header_frames(stream, block, end_stream))
        if end_stream:
            stream.local_closed = True
            self._finish_local(stream)

    def send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        """Queue DATA; what the windows allow goes out now."""
        if stream.local_closed or self.transport is None:
            return
        stream.pending.append([True, memoryview(data), end_stream])
        if end_stream:
            stream.local_closed = True
        self._flush(stream)

    async def drain(self, stream: Stream) -> None:
        """Wait until the stream's queued output is written (or the stream is gone)."""
        if not stream.pending or self.transport is None:
            return
        if stream.drained is None or stream.drained.done():
            stream.drained = asyncio.get_running_loop().create_future()
        await stream.drained

    def _flush(self, stream: Stream) -> None:
        out: list[bytes] = []
        pending = stream.pending
        while pending:
            item = pending[0]
            is_data, payload, end_stream = item
            if not is_data:
                out.append(self.header_frames(stream, payload, end_stream))
                pending.popleft()
                continue
            while True:
                allowed = max(0, min(len(payload), stream.send_window, self._send_window, self._peer_max_frame))
                if allowed == 0 and len(payload):
                    break
                last = allowed == len(payload)
                out.append(frame_head(DATA, END_STREAM if (last and end_stream) else 0, stream.id, allowed))
                out.append(bytes(payload[:allowed]))
                stream.send_window -= allowed
                self._send_window -= allowed
                payload = payload[allowed:]
                if last:
                    break
            if len(payload):
                item[1] = payload
                break
            pending.popleft()
        if out:
            self._write(b"".join(out))
        if pending:
            self._blocked[stream.id] = stream
        else:
            self._blocked.pop(stream.id, None)
            _resolve(stream)
            if stream.local_closed:
                self._finish_local(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                break
            self._flush(stream)

    def _finish_local(self, stream: Stream) -> None:
        """Our side is done; a peer still sending is told to stop (RST_STREAM NO_ERROR)."""
        if stream.pending:
            return
        if not stream.remote_closed:
            stream.remote_closed = True
            self._write(frame(RST_STREAM, 0, stream.id, U32.pack(NO_ERROR)))
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.remote_closed and stream.local_closed and not stream.pending:
            self.streams.pop(stream.id, None)
            if self.closing and not self.streams:
                self.close()

    def reset(self, stream: Stream, code: int = CANCEL) -> None:
        """RST_STREAM: abandon the stream in both directions."""
        if self.streams.pop(stream.id, None) is None:
            return
        stream.remote_closed = stream.local_closed = True
        stream.pending.clear()
        self._blocked.pop(stream.id, None)
        _resolve(stream)
        self._write(frame(RST_STREAM, 0, stream.id, U32.pack(code)))
        self.handler.stream_reset(self, stream)
        if self.closing and not self.streams:
            self.close()

    # -- connection ---------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful: refuse new streams, finish the open ones, then close."""
        if self.transport is None:
            return
        self._write(frame(GOAWAY, 0, 0, U32.pack(self.last_stream_id) + U32.pack(NO_ERROR)))
        self.closing = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._out:
                self.transport.write(b"".join(self._out))
                self._out.clear()  # (a scheduled _write_out finds nothing left)
            self.transport.close()

    def _goaway_and_close(self, code: int, message: str) -> None:
        log.info("HTTP/2 connection %s closed: %s", self.peer, message)
        self._write(frame(GOAWAY, 0, 0, U32.pack(self.last_stream_id) + U32.pack(code) + message.encode()[:256]))
        self.closing = True
        self.close()


def _resolve(stream: Stream) -> None:
    if stream.drained is not None and not stream.drained.done():
        stream.drained.set_result(None)
