"""The KServe v2 / Triton HTTP API as a Starlette application.

Handlers are thin: read the body (bounded), decode with ``protocol.rest``,
call the model manager, encode. Every InferenceServerError becomes
``{"error": "..."}`` with its status code (and ``Retry-After`` when it has
one); anything unexpected is logged with the request id and answered 500.
A client that disconnects while its request waits in the queue cancels it,
so the model never computes an answer nobody will read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from inferstack import __version__
from inferstack.core.errors import (
    CancelledError,
    InferenceServerError,
    InvalidArgumentError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    UnsupportedError,
)
from inferstack.llm.http_api import routes as llm_routes
from inferstack.observability.logs import request_id_var
from inferstack.protocol import rest
from inferstack.protocol.shared_memory import SystemSharedMemory
from inferstack.repository.config import ModelConfigError, parse_config_json
from inferstack.serving import ModelManager

log = logging.getLogger("inferstack.http")

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
    "parameters",
    "schedule_policy",
    "system_shared_memory",
    "generate",
]

_JSON = "application/json"
_NO_CUDA_SHM = "CUDA shared memory is not supported by this server; use system shared memory"


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=_JSON, headers=headers)


def error_response(error: InferenceServerError) -> Response:
    headers = None
    if error.retry_after is not None:
        headers = {"Retry-After": str(max(1, round(error.retry_after)))}
    return _json({"error": error.message}, error.http_status, headers)


_ids = itertools.count(1)
_id_prefix = f"{os.getpid():x}"


class HttpApi:
    """Route handlers bound to one model manager."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        max_body_bytes: int,
        server_name: str = "inferstack",
        shared_memory: SystemSharedMemory | None = None,
    ) -> None:
        self.manager = manager
        #: The server's system shared memory regions (shared with gRPC); disabled if not given.
        self.shared_memory = shared_memory if shared_memory is not None else SystemSharedMemory()
        self.max_body_bytes = max_body_bytes
        self.server_name = server_name
        #: Set while shutting down: readiness turns false before connections close.
        self.draining = False
        #: (endpoint, status) -> responses sent; exported as inferstack_http_responses_total.
        #: Counts what never reaches a model too: malformed bodies, unknown models, 413s.
        self.responses: Counter[tuple[str, int]] = Counter()
        #: Routes other features add (the async jobs endpoints), served after these.
        self.extra_routes: list[Route] = []

    # -- plumbing ---------------------------------------------------------------------

    def handler(self, func: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        name = func.__name__
        responses = self.responses

        async def endpoint(request: Request) -> Response:
            request_id = request.headers.get("x-request-id") or f"{_id_prefix}-{next(_ids)}"
            token = request_id_var.set(request_id)
            try:
                response = await func(request, **request.path_params)
            except InferenceServerError as error:
                self._log_error(request.method, request.url.path, error)
                response = error_response(error)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                response = _json({"error": "internal server error; see the server log"}, 500)
            finally:
                request_id_var.reset(token)
            response.headers["x-request-id"] = request_id
            responses[(name, response.status_code)] += 1
            return response

        return endpoint

    @staticmethod
    def _log_error(method: str, path: str, error: InferenceServerError) -> None:
        level = logging.ERROR if error.http_status >= 500 and not isinstance(error, UnavailableError) else logging.INFO
        log.log(level, "%s %s -> %d: %s", method, path, error.http_status, error.message)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 once it passes the limit (compressed or not)."""
        return await read_asgi_body(request.receive, request.headers, self.max_body_bytes)

    # -- server -----------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": self.server_name, "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        ready = not self.draining and self.manager.server_ready()
        return Response(status_code=200 if ready else 503)

    # -- models -----------------------------------------------------------------------

    async def model_metadata(self, request: Request, model: str, version: str = "") -> Response:
        found = self.manager.get(model, version)
        return _json(found.metadata(self.manager.ready_version_numbers(model)))

    async def model_ready(self, request: Request, model: str, version: str = "") -> Response:
        if not self.manager.known(model):
            raise NotFoundError(f"unknown model {model!r}")
        ready = self.manager.is_ready(model, version)
        return _json({"name": model, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request, model: str, version: str = "") -> Response:
        return _json(self.manager.get(model, version).config_dict())

    async def model_stats(self, request: Request, model: str = "", version: str = "") -> Response:
        if model:
            if version:
                versions = [self.manager.get(model, version)]
            else:
                if not self.manager.known(model):
                    raise NotFoundError(f"unknown model {model!r}")
                versions = [v for v in self.manager.loaded_versions() if v.name == model]
        else:
            versions = self.manager.loaded_versions()
        return _json({"model_stats": [v.stats.as_triton_dict(v.name, v.version_str) for v in versions]})

    async def infer_asgi(self, scope: Scope, receive: Receive, send: Send, model: str, version: str) -> None:
        """``POST /v2/models/{m}[/versions/{v}]/infer``, straight on ASGI.

        The hot path skips Starlette's request/response objects and middleware
        (see :class:`InferFastPath`); errors, request ids, logging and the
        response counter behave exactly as in :meth:`handler`.
        """
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = headers.get("x-request-id") or f"{_id_prefix}-{next(_ids)}"
        token = request_id_var.set(request_id)
        extra: list[tuple[bytes, bytes]] = []
        try:
            status = 200
            content, content_type, json_length = await self._infer(model, version, headers, receive)
            if json_length is not None:
                extra.append((b"inference-header-content-length", str(json_length).encode()))
        except InferenceServerError as error:
            self._log_error(scope["method"], scope["path"], error)
            status, content, content_type = error.http_status, orjson.dumps({"error": error.message}), _JSON
            if error.retry_after is not None:
                extra.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            status, content = 500, orjson.dumps({"error": "internal server error; see the server log"})
            content_type = _JSON
        finally:
            request_id_var.reset(token)
        self.responses[("infer", status)] += 1
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(content)).encode()),
                (b"x-request-id", request_id.encode()),
                *extra,
            ],
        })
        await send({"type": "http.response.body", "body": content})

    async def _infer(
        self, model: str, version: str, headers: Mapping[str, str], receive: Receive
    ) -> tuple[bytes, str, int | None]:
        target = self.manager.get(model, version)
        body = await read_asgi_body(receive, headers, self.max_body_bytes)
        header_length = headers.get(rest.HEADER_LENGTH)
        header_length_value: int | None = None
        if header_length is not None:
            try:
                header_length_value = int(header_length)
            except ValueError:
                raise InvalidArgumentError(f"invalid Inference-Header-Content-Length {header_length!r}") from None
        # The lease keeps the shared memory regions this request uses mapped
        # until its outputs are written, even if they are unregistered meanwhile.
        with self.shared_memory.lease() as shm:
            infer_request, output_format = rest.decode_request(
                body, header_length_value, model, version, shared_memory=shm
            )
            response = await _cancel_on_disconnect(receive, target.infer(infer_request))
            if response is None:  # the client is gone; nobody reads this
                raise CancelledError("client disconnected; request cancelled")
            content, json_length = rest.encode_response(response, output_format, shm)
        if json_length is None:
            return content, _JSON, None
        return content, "application/octet-stream", json_length

    # -- repository -------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        body = await self.read_body(request)
        ready_only = False
        if body.strip():
            document = _parse_json_object(body)
            ready_only = document.get("ready", False)
            if not isinstance(ready_only, bool):
                raise InvalidArgumentError("'ready' must be a boolean")
        return _json(self.manager.index(ready_only))

    async def repository_load(self, request: Request, model: str) -> Response:
        self.manager.require_explicit_mode("load")
        body = await self.read_body(request)
        override = None
        if body.strip():
            parameters = _parse_json_object(body).get("parameters") or {}
            if not isinstance(parameters, dict):
                raise InvalidArgumentError("'parameters' must be a JSON object")
            files = [key for key in parameters if key.startswith("file:")]
            if files:
                raise UnsupportedError(
                    f"loading model files sent in the request ({files[0]!r}) is not supported"
                )
            if "config" in parameters:
                config_text = parameters["config"]
                if not isinstance(config_text, str):
                    raise InvalidArgumentError("parameter 'config' must be a JSON string")
                try:
                    override = parse_config_json(config_text, f"parameter 'config' for {model!r}")
                except ModelConfigError as exc:
                    raise InvalidArgumentError(str(exc)) from None
        self.manager.repository.model_dir(model)  # 400 / 404 naming the problem
        await self.manager.load(model, override)
        return _json({})

    async def repository_unload(self, request: Request, model: str) -> Response:
        self.manager.require_explicit_mode("unload")
        await self.read_body(request)
        await self.manager.unload(model)
        return _json({})

    # -- shared memory ----------------------------------------------------------------

    async def system_shm_status(self, request: Request, name: str = "") -> Response:
        await self.read_body(request)
        return _json(self.shared_memory.status(name))

    async def system_shm_register(self, request: Request, name: str) -> Response:
        document = _parse_json_object(await self.read_body(request))
        key = document.get("key")
        if not isinstance(key, str):
            raise InvalidArgumentError(f"shared memory region {name!r}: 'key' must be a string")
        self.shared_memory.register(name, key, document.get("offset", 0), document.get("byte_size"))
        return _json({})

    async def system_shm_unregister(self, request: Request, name: str = "") -> Response:
        await self.read_body(request)
        self.shared_memory.unregister(name)
        return _json({})

    async def cuda_shm_status(self, request: Request, name: str = "") -> Response:
        await self.read_body(request)
        if name:
            raise NotFoundError(f"unknown CUDA shared memory region {name!r}: {_NO_CUDA_SHM}")
        return _json([])

    async def cuda_shm_register(self, request: Request, name: str) -> Response:
        raise UnsupportedError(f"cannot register {name!r}: {_NO_CUDA_SHM}")

    async def cuda_shm_unregister(self, request: Request, name: str = "") -> Response:
        # Nothing can be registered, so there is nothing to unregister: succeed,
        # as clients (perf_analyzer) unregister both kinds before they start.
        await self.read_body(request)
        return _json({})

    # -- app --------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        h = self.handler
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        return [
            # Normally answered by InferFastPath before routing; kept so the
            # Starlette app alone is complete (and other methods get 405).
            Route(f"{model}/infer", _InferRoute(self), methods=["POST"]),
            Route(f"{versioned}/infer", _InferRoute(self), methods=["POST"]),
            Route("/v2", h(self.server_metadata), methods=["GET"]),
            Route("/v2/health/live", h(self.live), methods=["GET"]),
            Route("/v2/health/ready", h(self.ready), methods=["GET"]),
            Route("/v2/models/stats", h(self.model_stats), methods=["GET"]),
            Route(model, h(self.model_metadata), methods=["GET"]),
            Route(versioned, h(self.model_metadata), methods=["GET"]),
            Route(f"{model}/ready", h(self.model_ready), methods=["GET"]),
            Route(f"{versioned}/ready", h(self.model_ready), methods=["GET"]),
            Route(f"{model}/config", h(self.model_config), methods=["GET"]),
            Route(f"{versioned}/config", h(self.model_config), methods=["GET"]),
            Route(f"{model}/stats", h(self.model_stats), methods=["GET"]),
            Route(f"{versioned}/stats", h(self.model_stats), methods=["GET"]),
            Route("/v2/repository/index", h(self.repository_index), methods=["POST"]),
            # {model:path}: a name holding an (encoded) "/" reaches the name check and
            # gets 400 saying why, instead of matching no route.
            Route("/v2/repository/models/{model:path}/load", h(self.repository_load), methods=["POST"]),
            Route("/v2/repository/models/{model:path}/unload", h(self.repository_unload), methods=["POST"]),
            *_shm_routes(self),
            *self.extra_routes,
            # OpenAI-compatible /v1 routes and the KServe generate extension (docs/llm.md).
            *llm_routes(self),
        ]


def _shm_routes(api: HttpApi) -> list[Route]:
    """Triton's shared memory extension: system regions work, CUDA ones are refused."""
    h = api.handler
    routes = []
    for kind, status, register, unregister in (
        ("system", api.system_shm_status, api.system_shm_register, api.system_shm_unregister),
        ("cuda", api.cuda_shm_status, api.cuda_shm_register, api.cuda_shm_unregister),
    ):
        base = f"/v2/{kind}sharedmemory"
        routes += [
            Route(f"{base}/status", h(status), methods=["GET", "POST"]),
            Route(f"{base}/region/{{name}}/status", h(status), methods=["GET", "POST"]),
            Route(f"{base}/region/{{name}}/register", h(register), methods=["POST"]),
            Route(f"{base}/unregister", h(unregister), methods=["POST"]),
            Route(f"{base}/region/{{name}}/unregister", h(unregister), methods=["POST"]),
        ]
    return routes


class _InferRoute:
    """The infer endpoint as a raw ASGI app inside the Starlette router."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params", {})
        await self.api.infer_asgi(scope, receive, send, params["model"], params.get("version", ""))


class InferFastPath:
    """The ASGI entry point: infer requests go straight to :meth:`HttpApi.infer_asgi`.

    Inference is the one endpoint where per-request overhead matters; routing
    it with a string test instead of Starlette's regex router, middleware
    stack and Request/Response objects saves a noticeable share of the
    server's CPU per request. Everything else goes to the Starlette app.
    """

    _PREFIX = "/v2/models/"
    _SUFFIX = "/infer"

    def __init__(self, api: HttpApi, app: Starlette) -> None:
        self.api = api
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(self._PREFIX) and path.endswith(self._SUFFIX):
                parts = path[len(self._PREFIX) : -len(self._SUFFIX)].split("/")
                if len(parts) == 1 and parts[0]:
                    return await self.api.infer_asgi(scope, receive, send, parts[0], "")
                if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                    return await self.api.infer_asgi(scope, receive, send, parts[0], parts[2])
        await self.app(scope, receive, send)


def create_app(api: HttpApi) -> InferFastPath:
    async def not_found(request: Request, exc: Exception) -> Response:
        return _json({"error": f"no endpoint {request.method} {request.url.path}"}, 404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _json({"error": f"method {request.method} not allowed on {request.url.path}"}, 405)

    app = Starlette(routes=api.routes(), exception_handlers={404: not_found, 405: method_not_allowed})
    return InferFastPath(api, app)


async def read_asgi_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """Read a request body from ASGI messages, refused with 413 once it passes ``limit``.

    Gzip/deflate bodies (``Content-Encoding``) are inflated under the same limit.
    """
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidArgumentError(f"invalid Content-Length {declared!r}") from None
        if length > limit:
            raise PayloadTooLargeError(f"request body of {length} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise CancelledError(f"client disconnected after sending {size} bytes of the request body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        body = _decompress(body, encoding, limit)
    elif encoding not in ("identity", ""):
        raise InvalidArgumentError(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    return body


async def _cancel_on_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and return None."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected:
            task.uncancel()
            log.info("client disconnected; request cancelled")
            return None
        raise
    finally:
        watcher.cancel()


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return document


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgumentError(f"body is not valid {encoding} data: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise PayloadTooLargeError(f"decompressed request body exceeds the limit of {limit} bytes")
    if not decompressor.eof:
        raise InvalidArgumentError(f"body is not valid {encoding} data: the compressed stream is truncated")
    return data
