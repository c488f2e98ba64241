"""Job metrics: queue length, oldest job age, jobs by outcome, job latency.

The queue numbers are read from the queue (Redis: cluster-wide) by a
background task every ``interval`` seconds, so a Prometheus scrape (served
from its own thread) never touches Redis or the event loop. Latency is
observed by whichever process finishes a job (the server's embedded workers,
or ``inferstack worker``), from submission to the final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferstack.core.stats import LATENCY_BUCKETS, Histogram
from inferstack.jobs.queue import JobQueue
from inferstack.jobs.types import OUTCOMES, QueueStats

log = logging.getLogger("inferstack.jobs")

PREFIX = "inferstack"
#: Job latency can be minutes (that is why it is async): buckets up to an hour.
JOB_BUCKETS: tuple[float, ...] = (*LATENCY_BUCKETS, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class JobMetrics:
    """This process's job histograms plus the latest queue snapshot."""

    def __init__(self) -> None:
        #: Submission to final state, by outcome.
        self.latency = {"succeeded": Histogram(JOB_BUCKETS), "failed": Histogram(JOB_BUCKETS)}
        #: One execution (claim to result), successful or not.
        self.execution = Histogram(JOB_BUCKETS)
        self.retries = 0
        self.webhooks = {"delivered": 0, "failed": 0}
        self.snapshot: QueueStats | None = None
        self.errors = 0

    async def refresh_forever(self, queue: JobQueue, interval: float = 2.0) -> None:
        failing = False
        while True:
            try:
                self.snapshot = await queue.stats()
                if failing:
                    log.info("job queue statistics readable again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the loop must survive
                self.errors += 1
                if not failing:
                    log.warning("cannot read job queue statistics: %s", exc)
                failing = True
            await asyncio.sleep(interval)

    def start(self, queue: JobQueue, interval: float = 2.0) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.refresh_forever(queue, interval), name="job-metrics")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class JobCollector(Collector):
    def __init__(self, metrics: JobMetrics, queue_name: str) -> None:
        self.metrics = metrics
        self.queue_name = queue_name

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        labels = [self.queue_name]
        snapshot = m.snapshot
        if snapshot is not None:
            yield _gauge("job_queue_length", "Jobs waiting for a worker (not yet claimed): the autoscaling signal.",
                         labels, snapshot.queued)
            yield _gauge("job_running", "Jobs claimed by a worker and not finished (running, or held by a "
                         "worker that died until the visibility timeout).", labels, snapshot.pending)
            yield _gauge("job_oldest_age_seconds", "Age of the oldest job not finished (0 when none).",
                         labels, snapshot.oldest_age)
            outcomes = CounterMetricFamily(f"{PREFIX}_jobs", "Jobs finished, by outcome (all processes sharing "
                                           "the queue).", labels=["queue", "outcome"])
            for outcome in OUTCOMES:
                outcomes.add_metric([*labels, outcome], snapshot.outcomes.get(outcome, 0))
            yield outcomes
        latency = HistogramMetricFamily(f"{PREFIX}_job_duration_seconds",
                                        "Submission to final state, for jobs this process finished.",
                                        labels=["queue", "outcome"])
        for outcome, histogram in m.latency.items():
            latency.add_metric([*labels, outcome], histogram.cumulative(), histogram.sum)
        yield latency
        execution = HistogramMetricFamily(f"{PREFIX}_job_execution_seconds",
                                          "One execution of a job by this process (claim to result).",
                                          labels=["queue"])
        execution.add_metric(labels, m.execution.cumulative(), m.execution.sum)
        yield execution
        retries = CounterMetricFamily(f"{PREFIX}_job_retries", "Retryable job failures sent back to the queue "
                                      "by this process.", labels=["queue"])
        retries.add_metric(labels, m.retries)
        yield retries
        webhooks = CounterMetricFamily(f"{PREFIX}_job_webhooks", "Webhook deliveries by this process, by outcome.",
                                       labels=["queue", "outcome"])
        for outcome, count in m.webhooks.items():
            webhooks.add_metric([*labels, outcome], count)
        yield webhooks
        errors = CounterMetricFamily(f"{PREFIX}_job_queue_errors", "Failed reads of the queue statistics.",
                                     labels=["queue"])
        errors.add_metric(labels, m.errors)
        yield errors


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["queue"])
    family.add_metric(labels, value)
    return family
