"""Replicas: discovery (static list, DNS), health and model-index polling, load, choice.

Each replica is polled every ``health_interval_s``: ``/v2/health/ready`` (a
draining or starting replica stops receiving new requests), the repository
index (which model versions are READY or LOADING there) and, when it exports
them, its Prometheus metrics (``inferstack_pending_requests``: queue depth per
model). A request for a model goes only to replicas where that model (version)
is READY, chosen by power of two choices on least outstanding requests: the
gateway's own in-flight count to the replica plus the replica's queue depth.
A connection failure ejects the replica at once (passive health); the next
successful poll readmits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from inferstack.gateway.config import DnsDiscovery, GatewayConfig, ReplicaSpec
from inferstack.gateway.policies import Target
from inferstack.gateway.resilience import CircuitBreaker
from inferstack.gateway.upstream import HttpUpstream, UpstreamError

log = logging.getLogger("inferstack.gateway.replicas")

_PENDING = re.compile(r'^inferstack_pending_requests\{([^}]*)\}\s+([0-9.eE+-]+)', re.MULTILINE)
_MODEL_LABEL = re.compile(r'model="((?:[^"\\]|\\.)*)"')


def parse_pending(text: str) -> dict[str, float]:
    """Queue depth per model from a replica's Prometheus text."""
    pending: dict[str, float] = {}
    for labels, value in _PENDING.findall(text):
        match = _MODEL_LABEL.search(labels)
        if match:
            pending[match.group(1)] = pending.get(match.group(1), 0.0) + float(value)
    return pending


@dataclass(eq=False)
class Replica:
    spec: ReplicaSpec
    breaker: CircuitBreaker
    source: str = "static"
    #: last health probe: process answered / readiness 200
    live: bool = False
    ready: bool = False
    #: passive ejection after a connection failure; cleared by the next good poll
    ejected: bool = False
    polled: bool = False
    #: model -> version -> state (READY, LOADING, UNAVAILABLE, ...) from the repository index
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)
    inflight: int = 0
    last_error: str = ""
    task: asyncio.Task[None] | None = None
    http_client: HttpUpstream | None = None
    metrics_client: HttpUpstream | None = None
    grpc_channel: Any = None

    @property
    def key(self) -> str:
        return self.spec.http

    @property
    def label(self) -> str:
        return urlsplit(self.spec.http).netloc

    def serves(self, target: Target) -> bool:
        versions = self.models.get(target.model)
        if not versions:
            return False
        if target.version:
            return versions.get(target.version) == "READY"
        return "READY" in versions.values()

    @property
    def routable(self) -> bool:
        return self.ready and not self.ejected

    def describe(self) -> dict[str, Any]:
        from inferstack.gateway.resilience import STATE_NAMES

        return {
            "http": self.spec.http, "grpc": self.spec.grpc, "metrics": self.spec.metrics, "source": self.source,
            "live": self.live, "ready": self.ready, "ejected": self.ejected,
            "breaker": STATE_NAMES[self.breaker.state], "inflight": self.inflight,
            "pending": self.pending, "models": self.models, "last_error": self.last_error,
        }


class NoReplica(Exception):
    """No replica can take the request now: status and message for the client."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ReplicaPool:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.replicas: dict[str, Replica] = {}
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        #: called with a replica when it is removed (close its gRPC channel)
        self.on_remove: list[Callable[[Replica], None]] = []
        #: set after the first poll round of every static replica (readiness of the gateway)
        self.first_round = asyncio.Event()

    # -- membership ------------------------------------------------------------------

    def add(self, spec: ReplicaSpec, source: str = "static") -> Replica:
        existing = self.replicas.get(spec.key)
        if existing is not None:
            return existing
        c = self.config
        replica = Replica(spec, CircuitBreaker(c.breaker_failures, c.breaker_error_rate, c.breaker_min_requests,
                                               c.breaker_open_s), source=source)
        replica.http_client = HttpUpstream(spec.http, max_idle=c.connections_per_replica)
        if spec.metrics:
            replica.metrics_client = HttpUpstream(spec.metrics, max_idle=1)
        self.replicas[spec.key] = replica
        if self._started:
            replica.task = asyncio.get_running_loop().create_task(self._poll_loop(replica), name=f"poll {spec.key}")
        log.info("replica added: %s (%s)", spec.http, source)
        return replica

    def remove(self, key: str) -> bool:
        replica = self.replicas.pop(key, None)
        if replica is None:
            return False
        if replica.task is not None:
            replica.task.cancel()
        for client in (replica.http_client, replica.metrics_client):
            if client is not None:
                client.close()
        for callback in self.on_remove:
            callback(replica)
        log.info("replica removed: %s", key)
        return True

    async def start(self) -> None:
        self._started = True
        loop = asyncio.get_running_loop()
        for replica in self.replicas.values():
            replica.task = loop.create_task(self._poll_loop(replica), name=f"poll {replica.key}")
        for discovery in self.config.dns:
            self._tasks.append(loop.create_task(self._dns_loop(discovery), name=f"dns {discovery.name}"))
        self._tasks.append(loop.create_task(self._first_round()))

    async def stop(self) -> None:
        tasks = [r.task for r in self.replicas.values() if r.task is not None] + self._tasks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for replica in self.replicas.values():
            for client in (replica.http_client, replica.metrics_client):
                if client is not None:
                    client.close()

    async def _first_round(self) -> None:
        deadline = time.monotonic() + 5 * self.config.health_timeout_s
        while time.monotonic() < deadline and not all(r.polled for r in self.replicas.values()):
            await asyncio.sleep(0.02)
        self.first_round.set()

    # -- polling ---------------------------------------------------------------------

    async def _poll_loop(self, replica: Replica) -> None:
        while True:
            try:
                await self.poll(replica)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad poll must never stop polling
                log.warning("polling %s failed: %s", replica.key, exc)
            await asyncio.sleep(self.config.health_interval_s)

    async def poll(self, replica: Replica) -> None:
        """One health + index + load probe of a replica."""
        timeout = self.config.health_timeout_s
        client = replica.http_client
        assert client is not None
        try:
            status, _, _ = await client.request(b"GET", "/v2/health/ready", b"", timeout=timeout)
            ready = status == 200
            status, _, body = await client.request(b"POST", "/v2/repository/index",
                                                   b"Content-Type: application/json\r\n", b"{}", timeout=timeout)
            if status != 200:
                raise RuntimeError(f"repository index answered {status}")
            models: dict[str, dict[str, str]] = {}
            for row in orjson.loads(body):
                versions = models.setdefault(str(row.get("name", "")), {})
                state = str(row.get("state", "UNAVAILABLE")).upper()
                versions[str(row.get("version", ""))] = state
            pending: dict[str, float] = {}
            if replica.metrics_client is not None and replica.spec.metrics:
                path = urlsplit(replica.spec.metrics).path or "/metrics"
                try:
                    status, _, body = await replica.metrics_client.request(b"GET", path, b"", timeout=timeout)
                    if status == 200:
                        pending = parse_pending(body.decode("utf-8", "replace"))
                except (UpstreamError, TimeoutError, ValueError):
                    pending = {}
        except (UpstreamError, TimeoutError, OSError, RuntimeError, ValueError) as exc:
            if replica.live or not replica.polled:
                log.warning("replica %s is down: %s", replica.key, exc or type(exc).__name__)
            replica.live = replica.ready = False
            replica.last_error = str(exc) or type(exc).__name__
            replica.polled = True
            return
        if not replica.ready and ready:
            log.info("replica %s is ready", replica.key)
        elif replica.ready and not ready:
            log.info("replica %s is not ready: no new requests (in-flight ones finish)", replica.key)
        if replica.ejected:
            log.info("replica %s answers again: readmitted", replica.key)
        replica.live = True
        replica.ready = ready
        replica.ejected = False
        replica.models = models
        replica.pending = pending
        replica.last_error = ""
        replica.polled = True

    def eject(self, replica: Replica, reason: str) -> None:
        if not replica.ejected:
            log.warning("replica %s ejected: %s", replica.key, reason)
        replica.ejected = True
        replica.last_error = reason

    async def _dns_loop(self, discovery: DnsDiscovery) -> None:
        loop = asyncio.get_running_loop()
        mine: set[str] = set()
        while True:
            try:
                infos = await loop.getaddrinfo(discovery.name, discovery.http_port, type=socket.SOCK_STREAM)
                addresses = sorted({info[4][0] for info in infos})
                found: set[str] = set()
                for address in addresses:
                    host = f"[{address}]" if ":" in address else address
                    spec = ReplicaSpec(
                        http=f"{discovery.scheme}://{host}:{discovery.http_port}",
                        grpc=f"{host}:{discovery.grpc_port}" if discovery.grpc_port else None,
                        metrics=f"http://{host}:{discovery.metrics_port}/metrics" if discovery.metrics_port else None,
                    )
                    found.add(spec.key)
                    if spec.key not in self.replicas:
                        self.add(spec, source=f"dns:{discovery.name}")
                for key in mine - found:
                    if self.replicas.get(key) is not None and self.replicas[key].source.startswith("dns:"):
                        self.remove(key)
                mine = found
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("resolving %s failed: %s (keeping the last answer)", discovery.name, exc)
            await asyncio.sleep(discovery.interval_s)

    # -- choice ----------------------------------------------------------------------

    def known_models(self) -> dict[str, set[str]]:
        known: dict[str, set[str]] = {}
        for replica in self.replicas.values():
            for model, versions in replica.models.items():
                known.setdefault(model, set()).update(v for v in versions if v)
        return known

    def candidates(self, target: Target) -> list[Replica]:
        return [r for r in self.replicas.values() if r.routable and r.serves(target)]

    def pick(self, target: Target, exclude: set[Replica] | None = None) -> Replica:
        """Power of two choices, least outstanding (in-flight + replica queue depth)."""
        candidates = [r for r in self.candidates(target) if r.breaker.allow() and (not exclude or r not in exclude)]
        if not candidates:
            raise self.explain(target, exclude)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        model = target.model
        score_a = a.inflight + a.pending.get(model, 0.0)
        score_b = b.inflight + b.pending.get(model, 0.0)
        if score_a == score_b:
            return a  # sample() order is already random
        return a if score_a < score_b else b

    def explain(self, target: Target, exclude: set[Replica] | None = None) -> NoReplica:
        """Why no replica can take a request for ``target``: 404, or 503 with Retry-After."""
        name = target.model + (f" version {target.version}" if target.version else "")
        if not self.first_round.is_set():
            return NoReplica(503, "gateway is starting: replicas not polled yet", 1)
        listed = loading = ready_somewhere = False
        for replica in self.replicas.values():
            versions = replica.models.get(target.model)
            if not versions or (target.version and target.version not in versions):
                continue
            listed = True
            states = [versions[target.version]] if target.version else list(versions.values())
            if "LOADING" in states:
                loading = True
            if "READY" in states:
                ready_somewhere = True
        retry_after = self.config.loading_retry_after_s
        if loading:
            return NoReplica(503, f"model '{name}' is loading; retry later", retry_after)
        if ready_somewhere:
            if exclude:
                return NoReplica(503, f"no replica could serve '{name}' (tried {len(exclude)})", retry_after)
            return NoReplica(503, f"no healthy replica can serve '{name}' now (draining, ejected or circuit open)",
                             retry_after)
        if listed:
            return NoReplica(503, f"model '{name}' is not ready on any replica")
        if not any(r.live for r in self.replicas.values()):
            return NoReplica(503, "no replica is reachable", retry_after)
        return NoReplica(404, f"no replica has model '{name}'")

    def model_ready(self, target: Target) -> bool:
        return bool(self.candidates(target))

    def ready(self) -> bool:
        return any(r.routable for r in self.replicas.values())

    def merged_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The union of every replica's repository index (a version READY anywhere is READY)."""
        rank = {"READY": 3, "LOADING": 2, "UNLOADING": 1}
        merged: dict[tuple[str, str], str] = {}
        for replica in self.replicas.values():
            if not replica.live:
                continue
            for model, versions in replica.models.items():
                for version, state in versions.items():
                    key = (model, version)
                    if rank.get(state, 0) >= rank.get(merged.get(key, ""), -1):
                        merged[key] = state
        rows = []
        for (model, version), state in sorted(merged.items()):
            if ready_only and state != "READY":
                continue
            row: dict[str, Any] = {"name": model, "state": state}
            if version:
                row["version"] = version
            rows.append(row)
        return rows
