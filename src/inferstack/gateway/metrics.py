"""The gateway's Prometheus metrics (own registry, own port; names in docs/metrics.md).

Counters and histograms are updated on the request path; replica state
(readiness, breaker, in-flight) is read at scrape time by a collector, so the
hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from inferstack.gateway.replicas import ReplicaPool

P = "inferstack_gateway"
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, pool: ReplicaPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{P}_requests", "Requests answered, by model asked for, variant, replica and status.",
                                ["model", "variant", "replica", "protocol", "code"], registry=r)
        self.latency = Histogram(f"{P}_request_duration_seconds",
                                 "End-to-end latency through the gateway (successful requests).",
                                 ["model", "variant", "replica"], buckets=_BUCKETS, registry=r)
        self.errors = Counter(f"{P}_errors", "Requests answered with an error by the gateway itself, by reason.",
                              ["model", "reason"], registry=r)
        self.retries = Counter(f"{P}_retries", "Attempts retried on another replica, by reason.",
                               ["model", "reason"], registry=r)
        self.budget_exhausted = Counter(f"{P}_retry_budget_exhausted",
                                        "Retries refused because the retry budget was spent.", ["model"], registry=r)
        self.rate_limited = Counter(f"{P}_rate_limited", "Requests answered 429, by scope (key or model).",
                                    ["model", "scope"], registry=r)
        self.auth_failures = Counter(f"{P}_auth_failures", "Requests refused by auth, by status (401, 403).",
                                     ["code"], registry=r)
        self.shadow = Counter(f"{P}_shadow_requests",
                              "Shadow copies by outcome: match, mismatch, error.",
                              ["model", "shadow", "outcome"], registry=r)
        self.shadow_mismatch = Counter(f"{P}_shadow_mismatches",
                                       "Shadow answers that differ from the primary beyond the tolerance.",
                                       ["model", "shadow"], registry=r)
        self.shadow_latency = Histogram(f"{P}_shadow_duration_seconds", "Latency of shadow requests.",
                                        ["model", "shadow"], buckets=_BUCKETS, registry=r)
        r.register(_ReplicaCollector(pool))
        self._done: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def done(self, model: str, variant: str, replica: str, protocol: str, code: str, seconds: float) -> None:
        """Count one answered request (and its latency when it succeeded); label children are cached."""
        key = (model, variant, replica, protocol, code)
        children = self._done.get(key)
        if children is None:
            if len(self._done) > 10_000:
                self._done.clear()
            children = self._done[key] = (self.requests.labels(*key), self.latency.labels(model, variant, replica))
        children[0].inc()
        if code == "200":
            children[1].observe(seconds)


class _ReplicaCollector:
    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(f"{P}_replica_ready", "1 if the replica is ready and not ejected.", labels=["replica"])
        breaker = GaugeMetricFamily(f"{P}_replica_breaker_state",
                                    "Circuit breaker: 0 closed, 1 half-open, 2 open.", labels=["replica"])
        opened = CounterMetricFamily(f"{P}_replica_breaker_opened", "Times the breaker opened.", labels=["replica"])
        inflight = GaugeMetricFamily(f"{P}_replica_inflight_requests",
                                     "Requests the gateway has in flight to the replica.", labels=["replica"])
        pending = GaugeMetricFamily(f"{P}_replica_pending_requests",
                                    "The replica's queue depth per model (from its own metrics).",
                                    labels=["replica", "model"])
        for replica in list(self.pool.replicas.values()):
            label = [replica.label]
            ready.add_metric(label, 1.0 if replica.routable else 0.0)
            breaker.add_metric(label, float(replica.breaker.state))
            opened.add_metric(label, float(replica.breaker.opened_total))
            inflight.add_metric(label, float(replica.inflight))
            for model, value in replica.pending.items():
                pending.add_metric([replica.label, model], value)
        yield from (ready, breaker, opened, inflight, pending)

    def describe(self) -> list[Metric]:
        return []
