"""A small pooled HTTP/1.1 keep-alive client on asyncio streams, one pool per replica.

Why not httpx or aiohttp: the gateway's cost per request is what the
benchmark measures, and a generic client spends more time per request than
the replica's whole infer path on a tiny model (httpx ~700 req/s per core).
The gateway only needs: POST/GET with a byte body, Content-Length (or
chunked) responses, keep-alive reuse, and a clear difference between "could
not connect" (safe to retry anywhere, eject the replica) and "failed after
sending" (the replica may have run the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from urllib.parse import urlsplit


class UpstreamError(Exception):
    """A transport failure talking to a replica.

    ``connect``: the connection could not be opened (nothing was sent).
    """

    def __init__(self, message: str, *, connect: bool) -> None:
        super().__init__(message)
        self.connect = connect


_IDLE_S = 30.0  # below the replica's keep-alive (75 s) so a pooled connection is rarely stale


class _Connection:
    __slots__ = ("reader", "stamp", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.stamp = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


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

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 20)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc or type(exc).__name__}",
                                connect=True) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    def _acquire_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.stamp < _IDLE_S and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self.closed or len(self._idle) >= self.max_idle:
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
        head = b"".join((method, b" ", path.encode("latin-1"), b" HTTP/1.1\r\n", self._host_header, headers,
                         b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n"))
        conn = self._acquire_idle()
        reused = conn is not None
        if timeout is None:
            timeout = 3600.0
        async with asyncio.timeout(timeout):
            while True:
                if conn is None:
                    conn = await self._connect()
                try:
                    return await self._exchange(conn, head, body)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    conn.close()
                    partial = getattr(exc, "partial", None)
                    if reused and isinstance(exc, asyncio.IncompleteReadError) and not partial:
                        # The replica closed an idle keep-alive connection: nothing was read, try a fresh one.
                        conn, reused = None, False
                        continue
                    raise UpstreamError(f"{self.host}:{self.port} failed mid-request: {exc!r}",
                                        connect=False) from None
                except BaseException:
                    conn.close()
                    raise

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        writer, reader = conn.writer, conn.reader
        if body and len(body) < 65536:
            writer.write(head + body)
        else:
            writer.write(head)
            if body:
                writer.write(body)
        if writer.transport.get_write_buffer_size() > 65536:
            await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is not None:
            data = await reader.readexactly(int(length)) if length != "0" else b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            conn.close()
        else:
            self._release(conn)
        return status, headers, data

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()
