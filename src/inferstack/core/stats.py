"""Per model-version statistics, shared by the statistics API and Prometheus.

One object per loaded version holds Triton's statistics (counts and summed
nanoseconds for success, failure, queue and the three compute phases, plus
per-batch-size breakdowns) and fixed-bucket histograms. Updating is a few
integer additions on the event loop: no locks, no label lookups on the hot
path. The statistics endpoint and the Prometheus collector read the same
numbers, so they can never disagree.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Latency buckets in seconds (100 µs .. 60 s), shared by every duration histogram.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Batch-size buckets (samples per execution).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


#: Why a request failed: bad input, queue full, queue timeout, client gone, backend error.
FAILURE_REASONS: tuple[str, ...] = ("invalid", "rejected", "timeout", "canceled", "backend")


@dataclass(slots=True)
class Duration:
    """A count of events and their summed duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class Histogram:
    """Fixed buckets; ``counts[i]`` holds observations in ``(b[i-1], b[i]]``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with ``+Inf``, as Prometheus wants."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """Everything counted for one model version since it was loaded."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0  # samples (a batch-4 request counts 4)
        self.execution_count = 0  # backend executions (one per batch)
        # Response cache, as Triton counts it: a hit's time is the lookup (hashing
        # included); a miss's is the lookup plus inserting the computed outputs.
        self.cache_hit = Duration()
        self.cache_miss = Duration()
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}
        # reason -> count; every reason starts at 0 so its series exists from the start.
        self.failures: Counter[str] = Counter(dict.fromkeys(FAILURE_REASONS, 0))
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.compute_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def record_success(self, ns: int) -> None:
        self.success.add(ns)
        self.request_seconds.observe(ns / 1e9)
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, ns: int, reason: str) -> None:
        # Not in request_seconds: fast rejections would pull the latency
        # percentiles down exactly when the server is overloaded.
        self.fail.add(ns)
        self.failures[reason] += 1

    def record_cache_hit(self, ns: int) -> None:
        """A request answered from the response cache (also counted as a success,
        but not in inference_count or execution_count, as in Triton)."""
        self.cache_hit.add(ns)

    def record_cache_miss(self, ns: int, count: int = 1) -> None:
        """A lookup that found nothing (``count=1``), or the insertion after it (``count=0``)."""
        self.cache_miss.add(ns, count)

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)
        self.queue_seconds.observe(ns / 1e9)

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One backend execution of ``batch_size`` samples from ``requests`` requests.

        Like Triton, each request in the batch is charged the batch's compute
        time, so per-request averages stay meaningful.
        """
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        compute_seconds = (input_ns + infer_ns + output_ns) / 1e9
        for _ in range(requests):
            self.compute_seconds.observe(compute_seconds)
        self.batch_size.observe(batch_size)
        per_batch = self.batches.get(batch_size)
        if per_batch is None:
            per_batch = self.batches[batch_size] = BatchStats()
        per_batch.compute_input.add(input_ns)
        per_batch.compute_infer.add(infer_ns)
        per_batch.compute_output.add(output_ns)

    def as_triton_dict(self, name: str, version: str) -> dict[str, Any]:
        """The entry of Triton's ``model_stats`` list for this version."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": self.cache_hit.as_dict(),
                "cache_miss": self.cache_miss.as_dict(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": stats.compute_input.as_dict(),
                    "compute_infer": stats.compute_infer.as_dict(),
                    "compute_output": stats.compute_output.as_dict(),
                }
                for size, stats in sorted(self.batches.items())
            ],
        }
