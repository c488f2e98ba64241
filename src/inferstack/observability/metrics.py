"""Prometheus metrics, read at scrape time from the serving core.

Counters and histograms come straight from each loaded version's
:class:`~inferstack.core.stats.ModelStats` and gauges from the schedulers,
through one custom collector: serving a request costs no Prometheus call at
all, and ``/metrics`` can never disagree with the statistics API. Metric
names and labels are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from inferstack.core.stats import Histogram
from inferstack.llm.metrics import LLMCollector
from inferstack.serving import ModelManager, ModelState

log = logging.getLogger("inferstack.metrics")

PREFIX = "inferstack"
_LABELS = ["model", "version"]


class ModelCollector(Collector):
    """Exports every loaded model version's statistics."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str, labels: list[str] = _LABELS) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        success = counter("request_success", "Inference requests that succeeded.")
        failure = counter("request_failure", "Inference requests that failed, by reason.", [*_LABELS, "reason"])
        inferences = counter("inference_count", "Samples inferred (a request with batch 4 counts 4).")
        executions = counter("execution_count", "Backend executions (one per batch).")
        queue_us = counter("queue_duration_us", "Cumulative time requests waited in the queue (µs).")
        compute_us = counter(
            "compute_duration_us",
            "Cumulative compute time charged to requests, by phase (µs).",
            [*_LABELS, "phase"],
        )
        pending = GaugeMetricFamily(
            f"{PREFIX}_pending_requests",
            "Requests waiting in the queue: the autoscaling signal.",
            labels=_LABELS,
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_inflight_requests", "Requests queued or executing.", labels=_LABELS
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_model_ready", "1 if the model version is READY, else 0.", labels=_LABELS
        )
        load_seconds = GaugeMetricFamily(
            f"{PREFIX}_model_load_seconds", "Time the model version took to load, warmup included.", labels=_LABELS
        )
        histograms: dict[str, tuple[str, list[tuple[list[str], Histogram]]]] = {
            "request_duration_seconds": ("Latency of successful requests inside the server.", []),
            "queue_duration_seconds": ("Time a request waited in the queue.", []),
            "compute_duration_seconds": ("Compute time of the batch a request ran in.", []),
            "batch_size": ("Samples per backend execution.", []),
        }
        for version in self.manager.loaded_versions():
            labels = [version.name, version.version_str]
            stats = version.stats
            success.add_metric(labels, stats.success.count)
            for reason, count in list(stats.failures.items()):
                failure.add_metric([*labels, reason], count)
            inferences.add_metric(labels, stats.inference_count)
            executions.add_metric(labels, stats.execution_count)
            queue_us.add_metric(labels, stats.queue.ns / 1000)
            compute_us.add_metric([*labels, "input"], stats.compute_input.ns / 1000)
            compute_us.add_metric([*labels, "infer"], stats.compute_infer.ns / 1000)
            compute_us.add_metric([*labels, "output"], stats.compute_output.ns / 1000)
            pending.add_metric(labels, version.pending)
            scheduler = version.scheduler
            in_flight.add_metric(labels, scheduler.in_flight if scheduler is not None else 0)
            load_seconds.add_metric(labels, version.load_seconds)
            histograms["request_duration_seconds"][1].append((labels, stats.request_seconds))
            histograms["queue_duration_seconds"][1].append((labels, stats.queue_seconds))
            histograms["compute_duration_seconds"][1].append((labels, stats.compute_seconds))
            histograms["batch_size"][1].append((labels, stats.batch_size))
        for version in self.manager.all_versions():
            state.add_metric([version.name, version.version_str], 1 if version.state is ModelState.READY else 0)
        yield from (success, failure, inferences, executions, queue_us, compute_us,
                    pending, in_flight, state, load_seconds)
        for name, (doc, series) in histograms.items():
            family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, histogram in series:
                family.add_metric(labels, histogram.cumulative(), histogram.sum)
            yield family


class CacheCollector(Collector):
    """Exports the response cache: hits and misses per model version, and the cache's size.

    Nothing at all without ``--cache-config``; hit/miss series only for the
    versions whose config enables the cache.
    """

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        cache = self.manager.options.response_cache
        if cache is None:
            return
        hits = CounterMetricFamily(f"{PREFIX}_cache_hits", "Requests answered from the response cache.",
                                   labels=_LABELS)
        misses = CounterMetricFamily(f"{PREFIX}_cache_misses",
                                     "Requests looked up in the response cache and not found (then run).",
                                     labels=_LABELS)
        for version in self.manager.loaded_versions():
            if version.cache is not None:
                labels = [version.name, version.version_str]
                hits.add_metric(labels, version.stats.cache_hit.count)
                misses.add_metric(labels, version.stats.cache_miss.count)
        stats = cache.stats()
        yield hits
        yield misses
        yield GaugeMetricFamily(f"{PREFIX}_cache_entries", "Responses stored in the cache.", value=stats.entries)
        yield GaugeMetricFamily(f"{PREFIX}_cache_bytes",
                                "Bytes the stored responses take (keys, output names, output data).",
                                value=stats.bytes)
        yield GaugeMetricFamily(f"{PREFIX}_cache_capacity_bytes", "The cache's size limit (--cache-config).",
                                value=stats.capacity_bytes)
        yield CounterMetricFamily(f"{PREFIX}_cache_evictions",
                                  "Responses evicted (least recently used first) to make room.",
                                  value=stats.evictions)
        yield CounterMetricFamily(f"{PREFIX}_cache_errors",
                                  "Failed calls to the cache's store (Redis down or slow); requests still served.",
                                  value=stats.errors)


class HttpCollector(Collector):
    """Exports HTTP responses by endpoint and status code."""

    def __init__(self, responses: Mapping[tuple[str, int], int]) -> None:
        self.responses = responses

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_http_responses",
            "HTTP responses by endpoint and status code (including requests that never reach a model).",
            labels=["endpoint", "code"],
        )
        for (endpoint, code), count in list(self.responses.items()):
            family.add_metric([endpoint, str(code)], count)
        yield family


def create_registry(
    manager: ModelManager, http_responses: Mapping[tuple[str, int], int] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelCollector(manager))
    registry.register(CacheCollector(manager))
    registry.register(LLMCollector(manager))  # generation engines (docs/llm.md); nothing without one
    if http_responses is not None:
        registry.register(HttpCollector(http_responses))
    registry.register(ProcessCollector(registry=None))
    return registry


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Serve ``/metrics`` on its own port from a background thread.

    A thread (prometheus-client's own WSGI server) rather than the event loop:
    scrapes keep working even when the loop is saturated with inference.
    Returns the server; call ``shutdown()`` on it to stop.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
