"""A small pooled HTTP/1.1 keep-alive client on asyncio protocols, one pool per replica.

Why not httpx or aiohttp: the gateway's cost per request is what the
benchmark measures, and a generic client spends more time per request than
the replica's whole infer path on a tiny model (httpx ~700 req/s per core).
The gateway only needs: POST/GET with a byte body, Content-Length (or
chunked) responses, keep-alive reuse, and a clear difference between "could
not connect" (safe to retry anywhere, eject the replica) and "failed after
sending" (the replica may have run the request). A protocol object parses
the response as bytes arrive and completes one future per request: no
stream reader, no extra awaits, the timeout is one timer handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit


class UpstreamError(Exception):
    """A transport failure talking to a replica.

    ``connect``: the connection could not be opened (nothing was sent).
    """

    def __init__(self, message: str, *, connect: bool) -> None:
        super().__init__(message)
        self.connect = connect


_IDLE_S = 30.0  # below the replica's keep-alive (75 s) so a pooled connection is rarely stale
_MAX_HEAD = 64 * 1024


class _StaleConnection(Exception):
    """The replica closed a pooled connection before answering anything."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.closed = False
        self.stamp = time.monotonic()
        self.received_any = False
        # response being parsed
        self._status = 0
        self._headers: dict[str, str] | None = None
        self._length = -1
        self._chunked = False
        self._until_close = False

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received_any = True
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse()
            except Exception as exc:  # noqa: BLE001 - a malformed answer fails this request
                self._fail(exc)
        elif self.waiter is None:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self._until_close and self._headers is not None:
                self._finish(bytes(self.buffer))
                return
            if not self.received_any:
                waiter.set_exception(_StaleConnection())
            else:
                waiter.set_exception(ConnectionResetError(f"connection lost mid-response: {exc}"))

    # -- parsing -----------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self.buffer
        if self._headers is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise ValueError("response head too large")
                return
            lines = buffer[:end].decode("latin-1").split("\r\n")
            del buffer[: end + 4]
            self._status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._headers = headers
            length = headers.get("content-length")
            if length is not None:
                self._length = int(length)
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked = True
            else:
                self._until_close = True
                return
        if self._length >= 0:
            if len(buffer) >= self._length:
                body = bytes(buffer[: self._length])
                del buffer[: self._length]
                self._finish(body)
        elif self._chunked:
            self._parse_chunked()

    def _parse_chunked(self) -> None:
        buffer = self.buffer
        pos = 0
        parts = []
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return
            size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                # "0\r\n", optional trailer lines, then an empty line
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return
                del buffer[: trailer_end + 4]
                self._finish(b"".join(parts))
                return
            start = line_end + 2
            if len(buffer) < start + size + 2:
                return
            parts.append(bytes(buffer[start: start + size]))
            pos = start + size + 2

    def _finish(self, body: bytes) -> None:
        waiter, headers, status = self.waiter, self._headers, self._status
        self.waiter = None
        self._headers = None
        self._length = -1
        self._chunked = self._until_close = False
        assert headers is not None
        if headers.get("connection", "").lower() == "close" or self.buffer:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers, body))

    def _fail(self, exc: BaseException) -> None:
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    # -- use ---------------------------------------------------------------------

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        self.received_any = False
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpUpstream:
    """Keep-alive connections to one ``http(s)://host:port``."""

    def __init__(self, base_url: str, *, max_idle: int = 256, connect_timeout: float = 3.0) -> None:
        split = urlsplit(base_url)
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or (443 if split.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if split.scheme == "https" else None
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()
        self._host_header = f"Host: {split.netloc}\r\n".encode("latin-1")
        self.closed = False

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc or type(exc).__name__}",
                                connect=True) from None
        return conn

    def _acquire_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.stamp < _IDLE_S and conn.usable:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self.closed or len(self._idle) >= self.max_idle or not conn.usable:
            conn.close()
            return
        conn.stamp = time.monotonic()
        self._idle.append(conn)

    async def request(self, method: bytes, path: str, headers: bytes, body: bytes = b"",
                      timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; ``headers`` is pre-encoded ``Name: value\\r\\n`` lines (no Host/Content-Length).

        Returns (status, lower-case headers, body). Raises UpstreamError, or
        TimeoutError when ``timeout`` passes (the request may have run).
        """
        data = b"".join((method, b" ", path.encode("latin-1"), b" HTTP/1.1\r\n", self._host_header, headers,
                         b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 3600.0)
        conn = self._acquire_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(loop)
            future = conn.send(data, loop)
            timer = loop.call_at(deadline, _expire, future)
            try:
                result = await future
            except _StaleConnection:
                conn.close()
                if reused:  # the replica closed an idle connection: nothing was read, use a fresh one
                    conn, reused = None, False
                    continue
                raise UpstreamError(f"{self.host}:{self.port} closed the connection without answering",
                                    connect=False) from None
            except TimeoutError:
                conn.close()
                raise
            except (OSError, ValueError, IndexError) as exc:
                conn.close()
                raise UpstreamError(f"{self.host}:{self.port} failed mid-request: {exc!r}", connect=False) from None
            except BaseException:
                conn.close()  # cancelled: the connection's state is unknown
                raise
            finally:
                timer.cancel()
            if not conn.closed:
                self._release(conn)
            return result

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
