"""The gateway's HTTP side: a raw ASGI app speaking KServe v2 (and the admin API).

The infer path never decodes a tensor: the body goes to the replica as the
bytes it arrived as (only the path changes when a policy picks another model
or version), and the replica's answer comes back as bytes with its
``Content-Type`` / ``Inference-Header-Content-Length``. Routing by string
tests instead of a framework router keeps the gateway's cost per request
small (see benchmarks/bench_gateway.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any
from urllib.parse import unquote

import orjson

from inferstack import __version__
from inferstack.gateway.auth import AuthError, Principal, check_admin
from inferstack.gateway.config import ConfigError, parse_replica
from inferstack.gateway.httpserver import Request, Response
from inferstack.gateway.policies import Policy, Target
from inferstack.gateway.ratelimit import RateLimited
from inferstack.gateway.replicas import NoReplica, Replica
from inferstack.gateway.routing import Gateway, Result
from inferstack.gateway.shadow import decode_http_response, differs
from inferstack.gateway.upstream import UpstreamError

log = logging.getLogger("inferstack.gateway.http")
access = logging.getLogger("inferstack.gateway.access")

_JSON = b"application/json"
#: request headers passed to the replica (lower case), besides x-request-id
_FORWARD = frozenset((b"content-type", b"inference-header-content-length", b"content-encoding",
                      b"accept-encoding", b"traceparent", b"tracestate", b"triton-grpc-protocol"))
#: replica response headers passed back to the client
_BACK = ("content-type", "inference-header-content-length", "content-encoding", "retry-after")
_ids = itertools.count(1)
_id_prefix = f"gw{os.getpid():x}"


class HttpError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _split_model_path(rest: str) -> tuple[str, str, str] | None:
    """'m[/versions/v][/suffix]' -> (model, version, suffix) with suffix '' | 'infer' | 'ready' | ..."""
    parts = rest.split("/")
    if not parts[0]:
        return None
    model = unquote(parts[0])
    version = ""
    tail = parts[1:]
    if len(tail) >= 2 and tail[0] == "versions":
        version = tail[1]
        tail = tail[2:]
    if len(tail) > 1:
        return None
    return model, version, (tail[0] if tail else "")


class GatewayHttpApp:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.max_body = gateway.config.max_request_bytes
        self.access_log = gateway.config.access_log

    # -- ASGI plumbing ---------------------------------------------------------------

    async def __call__(self, req: Request) -> Response:
        headers = req.headers
        request_id = (headers.get(b"x-request-id") or b"").decode("latin-1") or f"{_id_prefix}-{next(_ids)}"
        path = req.path
        method = req.method
        started = time.perf_counter()
        status = 500
        try:
            if path.startswith("/v2/models/") and method == "POST" and path.endswith("/infer"):
                response = await self.infer(req, request_id, started)
            else:
                status, body, extra = await self.other(req, request_id)
                response = _response(status, body, request_id, extra)
        except HttpError as exc:
            extra = [(b"retry-after", str(exc.retry_after).encode())] if exc.retry_after else []
            response = _response(exc.status, orjson.dumps({"error": exc.message}), request_id, extra)
        except Exception:
            log.exception("%s %s failed (request %s)", method, path, request_id)
            response = _response(500, orjson.dumps({"error": "internal gateway error; see the gateway log"}),
                                 request_id, [])
        status = response.status
        if self.access_log:
            access.info("%s %s %s %d %.2fms id=%s", req.client, method, path, status,
                        (time.perf_counter() - started) * 1000, request_id)
        return response

    def _principal(self, headers: dict[bytes, bytes], model: str | None) -> Principal:
        gw = self.gw
        try:
            authz = headers.get(b"authorization")
            key = headers.get(b"x-api-key")
            principal = gw.auth.authenticate(authz.decode("latin-1") if authz else None,
                                             key.decode("latin-1") if key else None)
            if model is not None:
                gw.auth.authorize(principal, model)
        except AuthError as exc:
            gw.metrics.auth_failures.labels(str(exc.status)).inc()
            raise HttpError(exc.status, exc.message) from None
        return principal

    def _limit(self, principal: Principal, req: Request, model: str) -> None:
        try:
            self.gw.limiter.check(principal, req.client, model)
        except RateLimited as exc:
            self.gw.metrics.rate_limited.labels(model, exc.scope).inc()
            raise HttpError(429, exc.message, exc.retry_after) from None

    # -- infer -----------------------------------------------------------------------

    async def infer(self, req: Request, request_id: str, started: float) -> Response:
        gw = self.gw
        headers = req.headers
        parsed = _split_model_path(req.path[len("/v2/models/"):])
        if parsed is None or parsed[2] != "infer":
            raise HttpError(404, f"no endpoint POST {req.path}")
        model, version, _ = parsed
        principal = self._principal(headers, model)
        self._limit(principal, req, model)
        body = req.body
        policy = gw.policies.get(model)
        sticky = None
        text_headers = _TextHeaders(headers)
        if policy is not None and policy.sticky_parameter is not None and not version:
            sticky = _body_parameter(body, headers, policy.sticky_parameter)
        target, variant, policy = gw.resolve(model, version, text_headers, sticky)
        path = _infer_path(target)
        forward = [b"X-Request-Id: ", request_id.encode("latin-1"), b"\r\n"]
        for name, value in req.raw_headers:
            if name in _FORWARD:
                forward += [name, b": ", value, b"\r\n"]
        head = b"".join(forward)
        timeout = (policy.timeout_s if policy and policy.timeout_s else None) or gw.config.timeout_s

        async def call(replica: Replica) -> Result:
            return await _http_call(replica, b"POST", path, head, body, timeout)

        try:
            result = await gw.send(target, call, model)
        except NoReplica as exc:
            gw.metrics.errors.labels(model, "no_replica" if exc.status == 503 else "not_found").inc()
            raise HttpError(exc.status, exc.message, exc.retry_after) from None
        replica = result.replica
        replica_label = replica.label if replica is not None else ""
        status = _final_status(result)
        if result.failure is not None:
            gw.metrics.errors.labels(model, "timeout" if result.timed_out else "upstream").inc()
            message = (f"replica {replica_label} did not answer within {timeout:g}s" if result.timed_out
                       else f"replica {replica_label} failed: {result.failure}")
            body_out = orjson.dumps({"error": message})
            extra = [(b"content-type", _JSON)]
        else:
            body_out = result.body
            extra = [(k.encode(), result.headers[k].encode("latin-1")) for k in _BACK if k in result.headers]
        if variant:
            extra.append((b"x-inferstack-variant", variant.encode()))
        extra.append((b"x-inferstack-replica", replica_label.encode()))
        response = _response(status, body_out, request_id, extra)
        gw.metrics.done(model, variant, replica_label, "http", str(status), time.perf_counter() - started)
        if status == 200 and policy is not None and policy.shadow is not None and policy.shadow_hit():
            self._shadow(policy, model, body, head, result, timeout)
        return response

    def _shadow(self, policy: Policy, model: str, body: bytes, head: bytes, primary: Result, timeout: float) -> None:
        assert policy.shadow is not None
        shadow = policy.shadow
        label = shadow.target.model + (f"/{shadow.target.version}" if shadow.target.version else "")
        gw = self.gw

        async def run() -> None:
            started = time.perf_counter()
            path = _infer_path(shadow.target)

            async def call(replica: Replica) -> Result:
                return await _http_call(replica, b"POST", path, head, body, timeout)

            try:
                result = await gw.send(shadow.target, call, model)
                if result.failure is not None or result.status != 200:
                    gw.metrics.shadow.labels(model, label, "error").inc()
                    return
                gw.metrics.shadow_latency.labels(model, label).observe(time.perf_counter() - started)
                difference = differs(decode_http_response(primary.body, primary.headers),
                                     decode_http_response(result.body, result.headers), shadow.atol, shadow.rtol)
                if difference is None:
                    gw.metrics.shadow.labels(model, label, "match").inc()
                else:
                    gw.metrics.shadow.labels(model, label, "mismatch").inc()
                    gw.metrics.shadow_mismatch.labels(model, label).inc()
                    log.info("shadow %s differs from the primary for %s: %s", label, model, difference)
            except NoReplica:
                gw.metrics.shadow.labels(model, label, "error").inc()
            except Exception as exc:  # noqa: BLE001 - shadow failures never reach the client
                gw.metrics.shadow.labels(model, label, "error").inc()
                log.info("shadow request to %s failed: %s", label, exc)

        task = asyncio.get_running_loop().create_task(run())
        gw.shadow_tasks.add(task)
        task.add_done_callback(gw.shadow_tasks.discard)

    # -- everything else -------------------------------------------------------------

    async def other(self, req: Request, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        gw = self.gw
        headers, method, path = req.headers, req.method, req.path
        if path == "/v2/health/live" and method == "GET":
            return 200, b"", []
        if path == "/v2/health/ready" and method == "GET":
            return (200 if gw.pool.ready() and not gw.draining else 503), b"", []
        if path.startswith("/admin/"):
            return await self.admin(req)
        if path in ("/v2", "/v2/") and method == "GET":
            self._principal(headers, None)
            return 200, orjson.dumps({"name": "inferstack-gateway", "version": __version__,
                                      "extensions": ["binary_tensor_data", "model_repository",
                                                     "model_configuration", "statistics", "parameters"]}), []
        if path == "/v2/repository/index" and method == "POST":
            principal = self._principal(headers, None)
            body = req.body
            ready_only = False
            if body.strip():
                try:
                    ready_only = bool(orjson.loads(body).get("ready", False))
                except (orjson.JSONDecodeError, AttributeError):
                    raise HttpError(400, "repository index: body must be a JSON object") from None
            rows = [r for r in gw.pool.merged_index(ready_only) if principal.may_use(r["name"])]
            return 200, orjson.dumps(rows), []
        if path.startswith("/v2/repository/models/"):
            raise HttpError(400, "model load/unload is not available through the gateway: "
                                 "control each replica's repository directly")
        if "sharedmemory" in path:
            raise HttpError(400, "shared memory is not available through the gateway "
                                 "(the replicas are on other hosts); send tensors in the request")
        if path.startswith("/v2/models/") and method == "GET":
            parsed = _split_model_path(path[len("/v2/models/"):])
            if parsed is None or parsed[2] not in ("", "ready", "config", "stats"):
                raise HttpError(404, f"no endpoint GET {path}")
            model, version, suffix = parsed
            if model == "stats" and not version and not suffix:
                raise HttpError(400, "statistics of every model are per replica: ask for one model's, "
                                     "or each replica's /v2/models/stats")
            principal = self._principal(headers, model)
            self._limit(principal, req, model)
            if suffix == "ready":
                return (200 if self._model_ready(model, version) else 400), b"", []
            target, variant, _ = gw.resolve(model, version, _TextHeaders(headers))
            forward_path = _infer_path(target)[: -len("/infer")] + (f"/{suffix}" if suffix else "")
            head = b"X-Request-Id: " + request_id.encode("latin-1") + b"\r\n"

            async def call(replica: Replica) -> Result:
                return await _http_call(replica, b"GET", forward_path, head, b"", gw.config.timeout_s)

            try:
                result = await gw.send(target, call, model)
            except NoReplica as exc:
                raise HttpError(exc.status, exc.message, exc.retry_after) from None
            if result.failure is not None:
                raise HttpError(_final_status(result), f"replica failed: {result.failure}")
            extra = [(k.encode(), result.headers[k].encode("latin-1")) for k in _BACK if k in result.headers]
            if variant:
                extra.append((b"x-inferstack-variant", variant.encode()))
            return result.status, result.body, extra
        raise HttpError(404, f"no endpoint {method} {path}")

    def _model_ready(self, model: str, version: str) -> bool:
        policy = self.gw.policies.get(model)
        if policy is not None and not version:
            return any(self.gw.pool.model_ready(v.target) for v in policy.variants if v.weight > 0)
        return self.gw.pool.model_ready(Target(model, version))

    # -- admin API -------------------------------------------------------------------

    async def admin(self, req: Request) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        gw = self.gw
        headers, method, path = req.headers, req.method, req.path
        authz = headers.get(b"authorization")
        try:
            check_admin(gw.config.admin_tokens_sha256, authz.decode("latin-1") if authz else None)
        except AuthError as exc:
            gw.metrics.auth_failures.labels(str(exc.status)).inc()
            raise HttpError(exc.status, exc.message) from None
        parts = [unquote(p) for p in path.split("/")[3:] if p]  # after /admin/v1/
        if not path.startswith("/admin/v1/") or not parts:
            raise HttpError(404, f"no admin endpoint {method} {path}")
        try:
            if parts[0] == "policies":
                if len(parts) == 1 and method == "GET":
                    return 200, orjson.dumps({m: p.to_dict() for m, p in gw.policies.items()}), []
                model = parts[1] if len(parts) > 1 else ""
                if len(parts) == 2 and method == "GET":
                    policy = gw.policies.get(model)
                    if policy is None:
                        raise HttpError(404, f"no policy for model '{model}'")
                    return 200, orjson.dumps(policy.to_dict()), []
                if len(parts) == 2 and method == "PUT":
                    document = _json_object(req.body)
                    policy = gw.set_policy(model, document)
                    assert policy is not None
                    return 200, orjson.dumps(policy.to_dict()), []
                if len(parts) == 2 and method == "DELETE":
                    if model not in gw.policies:
                        raise HttpError(404, f"no policy for model '{model}'")
                    gw.set_policy(model, None)
                    return 200, b"{}", []
                if len(parts) == 3 and parts[2] == "rollback" and method == "POST":
                    policy = gw.rollback(model)
                    return 200, orjson.dumps(policy.to_dict() if policy else {}), []
            if parts[0] == "replicas" and len(parts) == 1:
                if method == "GET":
                    return 200, orjson.dumps([r.describe() for r in gw.pool.replicas.values()]), []
                if method in ("POST", "DELETE"):
                    document = _json_object(req.body)
                    spec_text = document.get("replica")
                    if not isinstance(spec_text, str):
                        raise HttpError(400, "'replica' must be a string: http://host:port[,grpc=...][,metrics=...]")
                    spec = parse_replica(spec_text, "replica")
                    if method == "POST":
                        gw.pool.add(spec, source="admin")
                        gw.record_replica_change(added=spec_text)
                        return 200, orjson.dumps(gw.pool.replicas[spec.key].describe()), []
                    if not gw.pool.remove(spec.key):
                        raise HttpError(404, f"no replica {spec.key}")
                    gw.record_replica_change(removed=spec.key)
                    return 200, b"{}", []
        except ConfigError as exc:
            raise HttpError(400, str(exc)) from None
        raise HttpError(404, f"no admin endpoint {method} {path}")


class _TextHeaders:
    """Lower-case str view of ASGI byte headers, decoded only for the names a policy asks about."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self._raw = raw

    def get(self, name: str) -> str | None:
        value = self._raw.get(name.encode("latin-1"))
        return None if value is None else value.decode("latin-1")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HttpError(400, "body must be a JSON object")
    return document


def _body_parameter(body: bytes, headers: dict[bytes, bytes], name: str) -> str | None:
    """A request parameter's value (the sticky key), from the JSON header of the body."""
    length = headers.get(b"inference-header-content-length")
    try:
        document = orjson.loads(body[: int(length)] if length else body)
        value = (document.get("parameters") or {}).get(name)
    except (orjson.JSONDecodeError, AttributeError, ValueError):
        return None
    return None if value is None else str(value)


def _infer_path(target: Target) -> str:
    if target.version:
        return f"/v2/models/{target.model}/versions/{target.version}/infer"
    return f"/v2/models/{target.model}/infer"


def _final_status(result: Result) -> int:
    if result.failure is None:
        return result.status
    return 504 if result.timed_out else 502


async def _http_call(replica: Replica, method: bytes, path: str, head: bytes, body: bytes, timeout: float) -> Result:
    client = replica.http_client
    assert client is not None
    try:
        status, headers, data = await client.request(method, path, head, body, timeout=timeout)
    except UpstreamError as exc:
        return Result(0, failure=str(exc), connect_failure=exc.connect)
    except TimeoutError:
        return Result(0, failure="timeout", timed_out=True)
    return Result(status, data, headers)


def _response(status: int, body: bytes, request_id: str, extra: list[tuple[bytes, bytes]]) -> Response:
    headers = [(b"x-request-id", request_id.encode("latin-1")), *extra]
    if body and not any(k == b"content-type" for k, _ in extra):
        headers.append((b"content-type", _JSON))
    return Response(status, body, headers)
