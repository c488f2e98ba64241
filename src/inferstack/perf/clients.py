"""Load-generating KServe v2 clients: raw keep-alive HTTP/1.1 and gRPC.

Both send request bodies encoded once, before the load starts, so a request
costs the client a socket write and a response read, nothing per tensor
element:

* HTTP: :class:`RawConnection`, a minimal HTTP/1.1 keep-alive client on
  asyncio streams (one request in flight per connection). A generic client
  such as httpx tops out around 700 requests/s per core, which would measure
  the client instead of the server; this one does tens of thousands
  (``docs/perf.md``). The whole request, head and body, is one ``bytes``
  built by :func:`build_request`.
* gRPC: ``ModelInfer`` calls go over perf's own HTTP/2 client
  (``perf/grpc_h2.py``: about a sixth of grpc.aio's client CPU per call) with
  the already serialized ``ModelInferRequest``; the response bytes stay
  undecoded: the status code is what says whether it worked. ``--grpc-client
  grpcio`` sends them through a ``grpc.aio`` channel instead.

:class:`HttpClient` and :class:`GrpcClient` add the calls perf needs around
the load: model metadata, model configuration (optional, Triton's
``model_configuration`` extension) and statistics (optional, Triton's
``statistics`` extension), each normalised to plain dicts / :class:`ServerStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

#: Per-request timeout used when none is given (seconds).
DEFAULT_TIMEOUT = 60.0
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


class PerfSetupError(Exception):
    """The target cannot be measured (unreachable, unknown model, bad arguments): a clear message, no traceback."""


# --------------------------------------------------------------------------------------
# Raw HTTP/1.1
# --------------------------------------------------------------------------------------


class RawConnection:
    """Minimal HTTP/1.1 keep-alive client on asyncio streams (one request in flight).

    Connects lazily on the first request and again after the server closes
    the connection or a request fails (the connection state is then unknown).
    """

    def __init__(self, host: str, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send pre-encoded request bytes; returns (status, lower-cased headers, body)."""
        try:
            if self.timeout is None:
                return await self._request(data)
            return await asyncio.wait_for(self._request(data), self.timeout)
        except BaseException:
            await self.close()  # connection state unknown
            raise

    async def _request(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            await self._connect()
        w, r = self.writer, self.reader
        w.write(data)
        if w.transport.get_write_buffer_size() > 65536:
            await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await r.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                parts.append(await r.readexactly(size))
                await r.readexactly(2)
            body = b"".join(parts)
        else:
            body = await r.read()  # until EOF
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body


def build_request(method: str, path: str, host: str, port: int, body: bytes = b"",
                  extra_headers: dict[str, str] | None = None) -> bytes:
    """The complete bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    for k, v in (extra_headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_message(status: int, body: bytes) -> str:
    """``HTTP 400: <the server's "error" field>`` (or the start of the body)."""
    text = None
    try:
        doc = orjson.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except orjson.JSONDecodeError:
        pass
    if text is None:
        text = body[:300].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def exception_message(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


def parse_url(url: str, protocol: str) -> tuple[str, int]:
    """``host:port``, ``http://host:port`` or ``grpc://host:port`` -> (host, port).

    The port defaults to 8000 for HTTP and 8001 for gRPC (Triton's)."""
    text = url.strip()
    if "://" not in text:
        text = "//" + text
    parts = urlsplit(text)
    if parts.scheme not in ("", "http", "grpc"):
        raise PerfSetupError(f"-u {url!r}: only plain http:// or grpc:// targets are supported (no TLS)")
    if parts.path not in ("", "/"):
        raise PerfSetupError(f"-u {url!r}: give host:port only (the /v2/... paths are added by perf)")
    try:
        port = parts.port
    except ValueError:
        raise PerfSetupError(f"-u {url!r}: invalid port") from None
    host = parts.hostname
    if not host:
        raise PerfSetupError(f"-u {url!r}: no host")
    return host, port if port is not None else DEFAULT_PORTS[protocol]


# --------------------------------------------------------------------------------------
# Server-side statistics
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerStats:
    """Cumulative Triton statistics of one model (summed over the versions asked for)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_input_count: int = 0
    compute_input_ns: int = 0
    compute_infer_count: int = 0
    compute_infer_ns: int = 0
    compute_output_count: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0

    def __sub__(self, other: ServerStats) -> ServerStats:
        return ServerStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def __add__(self, other: ServerStats) -> ServerStats:
        return ServerStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def add_entry(self, entry: dict[str, Any]) -> None:
        """Add one ``model_stats`` entry (HTTP JSON, or a gRPC message as a dict)."""
        inference = entry.get("inference_stats") or {}
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            duration = inference.get(key) or {}
            setattr(self, f"{key}_count", getattr(self, f"{key}_count") + int(duration.get("count", 0)))
            setattr(self, f"{key}_ns", getattr(self, f"{key}_ns") + int(duration.get("ns", 0)))
        self.inference_count += int(entry.get("inference_count", 0))
        self.execution_count += int(entry.get("execution_count", 0))

    @classmethod
    def from_document(cls, document: dict[str, Any], model: str, version: str) -> ServerStats:
        stats = cls()
        for entry in document.get("model_stats") or ():
            if entry.get("name", model) != model:
                continue
            if version and str(entry.get("version", version)) != version:
                continue
            stats.add_entry(entry)
        return stats

    def averages_us(self) -> dict[str, float | None]:
        """Per-request averages in microseconds (None where nothing was counted)."""

        def avg(count: int, ns: int) -> float | None:
            return ns / count / 1e3 if count > 0 else None

        return {
            "queue_us": avg(self.queue_count, self.queue_ns),
            "compute_input_us": avg(self.compute_input_count, self.compute_input_ns),
            "compute_infer_us": avg(self.compute_infer_count, self.compute_infer_ns),
            "compute_output_us": avg(self.compute_output_count, self.compute_output_ns),
            "request_us": avg(self.success_count, self.success_ns),
        }

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "success_count": self.success_count,
            "fail_count": self.fail_count,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "avg_batch_size": self.inference_count / self.execution_count if self.execution_count > 0 else None,
        }
        out.update(self.averages_us())
        return out


# --------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------


class HttpClient:
    """KServe v2 over raw HTTP/1.1 for one model: the calls around the load, and request building."""

    protocol = "http"

    def __init__(self, host: str, port: int, model: str, version: str = "",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.model, self.version, self.timeout = host, port, model, version, timeout
        base = f"/v2/models/{quote(model, safe='')}"
        if version:
            base += f"/versions/{quote(version, safe='')}"
        self.base_path = base
        self._conn = RawConnection(host, port, timeout)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        await self._conn.close()

    async def _get(self, path: str) -> tuple[int, bytes]:
        status, _, body = await self._conn.request(build_request("GET", path, self.host, self.port))
        return status, body

    async def metadata(self) -> dict[str, Any]:
        try:
            status, body = await self._get(self.base_path)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise PerfSetupError(f"cannot reach {self.target} over HTTP: {exception_message(exc, self.timeout)}") from None
        if status != 200:
            raise PerfSetupError(f"model metadata of {self.model!r} from {self.target}: {error_message(status, body)}")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise PerfSetupError(f"model metadata of {self.model!r}: not JSON: {body[:200]!r}") from None

    async def config(self) -> dict[str, Any] | None:
        """Triton's model configuration, or None when the server does not offer it."""
        try:
            status, body = await self._get(self.base_path + "/config")
            return orjson.loads(body) if status == 200 else None
        except Exception:  # noqa: BLE001 - optional extension
            return None

    async def statistics(self) -> ServerStats | None:
        """Cumulative statistics of the model, or None when the server does not offer them."""
        try:
            status, body = await self._get(self.base_path + "/stats")
            if status != 200:
                return None
            return ServerStats.from_document(orjson.loads(body), self.model, self.version)
        except Exception:  # noqa: BLE001 - optional extension
            return None

    def infer_request(self, body: bytes, header_length: int | None) -> bytes:
        """The full request bytes of one infer call (JSON, or JSON + binary tensors)."""
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(header_length)}
        return build_request("POST", self.base_path + "/infer", self.host, self.port, body, headers)


async def http_infer(conn: RawConnection, data: bytes) -> str | None:
    """One pre-encoded infer request; None on success, else the error message."""
    try:
        status, _, body = await conn.request(data)
    except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
        return exception_message(exc, conn.timeout)
    if status != 200:
        return error_message(status, body)
    return None


# --------------------------------------------------------------------------------------
# gRPC client
# --------------------------------------------------------------------------------------

_SERVICE = "/inference.GRPCInferenceService/"


def _grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # One channel carries every concurrent request of a process: don't let
        # grpc share a subchannel with some other channel of the same target.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def grpc_infer_request(model: str, version: str, inputs: list[tuple[str, str, list[int], bytes]],
                       outputs: list[str]) -> bytes:
    """A serialized ModelInferRequest with ``raw_input_contents`` (one entry per input, in order).

    ``inputs``: (name, datatype, shape, raw bytes) per input; ``outputs``: names to ask for.
    """
    from inferstack._proto import grpc_service_pb2 as pb

    message = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, _ in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.extend(raw for *_, raw in inputs)
    for name in outputs:
        message.outputs.add(name=name)
    return message.SerializeToString()


class GrpcClient:
    """KServe v2 over gRPC (grpc.aio, inferstack's own protos) for one model."""

    protocol = "grpc"

    def __init__(self, host: str, port: int, model: str, version: str = "",
                 timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = 1 << 30,
                 implementation: str = "inferstack") -> None:
        import grpc.aio

        from inferstack._proto import grpc_service_pb2 as pb
        from inferstack.perf.grpc_h2 import GrpcH2Channel

        #: ModelInfer calls (the load) go over perf's own HTTP/2 client unless ``grpcio`` is asked for;
        #: the setup calls (metadata, config, statistics) always use grpc.aio.
        self.implementation = implementation
        self._h2 = GrpcH2Channel(host, port) if implementation == "inferstack" else None

        self.pb = pb
        self.host, self.port, self.model, self.version, self.timeout = host, port, model, version, timeout
        self.channel = grpc.aio.insecure_channel(self.target, options=_grpc_options(max_message_bytes))
        unary = self.channel.unary_unary
        # Pre-serialized requests in, undecoded response bytes out.
        self._infer = unary(_SERVICE + "ModelInfer")
        self._metadata = unary(_SERVICE + "ModelMetadata", request_serializer=pb.ModelMetadataRequest.SerializeToString,
                               response_deserializer=pb.ModelMetadataResponse.FromString)
        self._config = unary(_SERVICE + "ModelConfig", request_serializer=pb.ModelConfigRequest.SerializeToString,
                             response_deserializer=pb.ModelConfigResponse.FromString)
        self._stats = unary(_SERVICE + "ModelStatistics",
                            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
                            response_deserializer=pb.ModelStatisticsResponse.FromString)

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def close(self) -> None:
        if self._h2 is not None:
            await self._h2.close()
        await self.channel.close()

    async def metadata(self) -> dict[str, Any]:
        import grpc

        try:
            meta = await self._metadata(self.pb.ModelMetadataRequest(name=self.model, version=self.version),
                                        timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise PerfSetupError(f"cannot reach {self.target} over gRPC: {exc.code().name}: {exc.details()}") from None
            raise PerfSetupError(f"model metadata of {self.model!r} from {self.target}: "
                                 f"{exc.code().name}: {exc.details()}") from None

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}

        return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                "inputs": [tensor(t) for t in meta.inputs], "outputs": [tensor(t) for t in meta.outputs]}

    async def config(self) -> dict[str, Any] | None:
        try:
            response = await self._config(self.pb.ModelConfigRequest(name=self.model, version=self.version),
                                          timeout=self.timeout)
        except Exception:  # noqa: BLE001 - optional extension
            return None
        return {"name": response.config.name, "max_batch_size": response.config.max_batch_size}

    async def statistics(self) -> ServerStats | None:
        try:
            response = await self._stats(self.pb.ModelStatisticsRequest(name=self.model, version=self.version),
                                         timeout=self.timeout)
        except Exception:  # noqa: BLE001 - optional extension
            return None
        stats = ServerStats()
        for entry in response.model_stats:
            if entry.name and entry.name != self.model:
                continue
            inference = entry.inference_stats
            stats.add_entry({
                "inference_count": entry.inference_count,
                "execution_count": entry.execution_count,
                "inference_stats": {
                    key: {"count": getattr(inference, key).count, "ns": getattr(inference, key).ns}
                    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
                },
            })
        return stats

    def infer_request(self, inputs: list[tuple[str, str, list[int], bytes]], outputs: list[str]) -> bytes:
        return grpc_infer_request(self.model, self.version, inputs, outputs)

    async def infer(self, data: bytes) -> str | None:
        """One pre-serialized ModelInfer call; None on success, else the error message."""
        if self._h2 is not None:
            from inferstack.perf.grpc_h2 import STATUS_NAMES, GrpcCallError

            try:
                await self._h2.unary(_SERVICE + "ModelInfer", data, self.timeout)
            except GrpcCallError as exc:
                return f"{STATUS_NAMES.get(exc.code, exc.code)}: {exc.details}"
            except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
                return exception_message(exc, self.timeout)
            return None
        try:
            await self._infer(data, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
            code = getattr(exc, "code", None)
            if callable(code):
                return f"{code().name}: {exc.details()}"
            return exception_message(exc, self.timeout)
        return None
