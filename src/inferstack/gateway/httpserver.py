"""A minimal HTTP/1.1 server on an asyncio protocol and httptools, for the gateway only.

Why not uvicorn: the gateway does little per request besides moving bytes, so
the server's own cost shows directly in its throughput. Through ASGI, uvicorn
writes a response's head and body with two socket writes and builds a scope,
receive/send coroutines and message dicts per request; the profile of the
gateway under load had a fifth of its samples in the head write alone. Here a
request is parsed by httptools (C), handled once its body is complete, and
answered with one write. It supports what KServe clients use: keep-alive,
pipelining (answered in order), ``Content-Length`` and chunked request
bodies, ``Expect: 100-continue``, a body size limit (413), TLS, and a
graceful close that lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

import httptools

log = logging.getLogger("inferstack.gateway.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_KEEP_ALIVE_S = 75.0


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: bytes
    #: lower-case name -> value (the last one wins for repeated names)
    headers: dict[bytes, bytes]
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    client: str


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


class BodyTooLarge(Exception):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.handler = server.handler
        self.max_body = server.max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = "-"
        self.pending: deque[Request | Response] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_active = time.monotonic()
        self.closing = False
        # request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        #: keep-alive decision of each pending item
        self._keep: deque[bool] = deque()

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = str(peer[0])
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, b"protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fatal(400, f"malformed HTTP request: {exc}".encode())
        if len(self.pending) > 32 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining far ahead waits for answers

    def _fatal(self, status: int, message: bytes) -> None:
        body = b'{"error":"' + message.replace(b'"', b"'") + b'"}'
        self._write(Response(status, body, [(b"content-type", b"application/json")]), keep_alive=False)
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.pending and (self.task is None or self.task.done())

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                if int(value) > self.max_body:
                    self._too_large = True

    def on_headers_complete(self) -> None:
        if self._too_large:
            return
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._size += len(body)
        if self._size > self.max_body:
            self._too_large = True
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        if self._too_large:
            message = f'{{"error":"request body exceeds the limit of {self.max_body} bytes"}}'.encode()
            self._queue(Response(413, message, [(b"content-type", b"application/json")]), keep_alive=False)
            return
        url = self._url
        path_bytes, _, query = url.partition(b"?")
        path = path_bytes.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self.parser.get_method().decode("latin-1"), path, query, dict(self._headers),
                          self._headers, body, self.client)
        self._queue(request, keep_alive)

    # -- dispatch --------------------------------------------------------------------

    def _queue(self, item: Request | Response, keep_alive: bool) -> None:
        self.pending.append(item)
        self._keep.append(keep_alive and not self.server.draining)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.pending and not self.closing:
            item = self.pending.popleft()
            keep_alive = self._keep.popleft()
            if isinstance(item, Request):
                try:
                    response = await self.handler(item)
                except asyncio.CancelledError:
                    return
                except Exception:  # one request's bug never takes the connection's others down
                    log.exception("%s %s failed", item.method, item.path)
                    response = Response(500, b'{"error":"internal gateway error; see the gateway log"}',
                                        [(b"content-type", b"application/json")])
            else:
                response = item
            if self.closing:
                return
            self._write(response, keep_alive)
            if not keep_alive:
                self.close()
                return
            if self.transport is not None and len(self.pending) <= 32:
                self.transport.resume_reading()
        self.last_active = time.monotonic()

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status = response.status
        parts = [b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS.get(status, b"Unknown"),
                 b"\r\ncontent-length: ", str(len(response.body)).encode(), b"\r\n"]
        for name, value in response.headers:
            parts += [name, b": ", value, b"\r\n"]
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(response.body)
        self.transport.write(b"".join(parts))


class HttpServer:
    def __init__(self, handler: Handler, *, max_body: int) -> None:
        self.handler = handler
        self.max_body = max_body
        self.connections: set[_Protocol] = set()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(self), host, port, ssl=ssl_context,
                                                reuse_address=True, backlog=2048)
        self._sweeper = loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than 75 s."""
        while True:
            await asyncio.sleep(5)
            cutoff = time.monotonic() - _KEEP_ALIVE_S
            for connection in list(self.connections):
                if connection.idle and connection.last_active < cutoff:
                    connection.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close every connection."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        deadline = time.monotonic() + timeout
        while any(not c.idle for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
