"""Prometheus metrics of generation engines, read at scrape time.

Like the rest of ``/metrics`` (see :mod:`inferstack.observability.metrics`), a
collector reads what the engines already count — serving a token costs no
Prometheus call. Names are listed in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "inferstack_llm"
_LABELS = ["model", "version"]


class LLMCollector(Collector):
    """Exports every loaded generation model's engine statistics (nothing without one)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        engines = [(v, e) for v in self.manager.loaded_versions() for e in getattr(v, "engines", [])]
        if not engines:
            return

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)

        def counter(name: str, doc: str, labels: list[str] = _LABELS) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        running = gauge("num_requests_running", "Sequences holding a KV-cache slot (prefilling or decoding).")
        waiting = gauge("num_requests_waiting", "Requests waiting for a KV-cache slot: the autoscaling signal.")
        slots_used = gauge("kv_slots_used", "KV-cache slots in use.")
        slots_total = gauge("kv_slots_total", "KV-cache slots (max_num_seqs).")
        prompt = counter("prompt_tokens", "Prompt tokens of finished requests.")
        generation = counter("generation_tokens", "Tokens generated.")
        finished = counter("requests_finished", "Requests that left the engine, by finish reason.",
                           [*_LABELS, "reason"])
        steps = counter("engine_steps", "Engine iterations (each runs a prefill and/or a decode pass).")
        histograms: dict[str, tuple[str, list[tuple[list[str], Any]]]] = {
            "time_to_first_token_seconds": ("Time from arrival to the first generated token.", []),
            "inter_token_latency_seconds": ("Time between consecutive tokens of a request.", []),
            "e2e_request_latency_seconds": ("Time from arrival to the last token.", []),
            "prompt_length_tokens": ("Prompt length of finished requests.", []),
            "generation_length_tokens": ("Generated tokens per finished request.", []),
        }
        for version, engine in engines:
            labels = [version.name, version.version_str]
            stats = engine.stats
            running.add_metric(labels, engine.num_running)
            waiting.add_metric(labels, engine.num_waiting)
            slots_used.add_metric(labels, engine.slots_in_use)
            slots_total.add_metric(labels, engine.num_slots)
            prompt.add_metric(labels, stats.prompt_tokens)
            generation.add_metric(labels, stats.generation_tokens)
            for reason, count in list(stats.finished.items()):
                finished.add_metric([*labels, reason], count)
            steps.add_metric(labels, stats.steps)
            histograms["time_to_first_token_seconds"][1].append((labels, stats.ttft))
            histograms["inter_token_latency_seconds"][1].append((labels, stats.itl))
            histograms["e2e_request_latency_seconds"][1].append((labels, stats.e2e))
            histograms["prompt_length_tokens"][1].append((labels, stats.prompt_len))
            histograms["generation_length_tokens"][1].append((labels, stats.generation_len))
        yield from (running, waiting, slots_used, slots_total, prompt, generation, finished, steps)
        for name, (doc, series) in histograms.items():
            family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, histogram in series:
                family.add_metric(labels, histogram.cumulative(), histogram.sum)
            yield family
