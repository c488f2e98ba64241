"""Workers: claim a job, run it, write the result exactly once, acknowledge, call back.

The same loop runs inside ``inferstack serve`` (embedded workers over the
server's own models, the default with the in-process queue) and as
``inferstack worker`` (its own ModelManager, or forwarding to a server with
``--server``). While a job runs, a heartbeat keeps the claim alive; if the
process dies, the claim goes stale and another worker takes the job over
after the visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from inferstack.jobs.metrics import JobCollector, JobMetrics, stop_task
from inferstack.jobs.queue import JobQueue, QueueSettings
from inferstack.jobs.runners import LocalRunner, RemoteRunner, RetryableError, Runner
from inferstack.jobs.types import Claim, JobRecord, JobStatus, Outcome
from inferstack.jobs.webhooks import WebhookSender
from inferstack.observability.logs import request_id_var

log = logging.getLogger("inferstack.jobs")


def callback_body(record: JobRecord, result: bytes | None) -> bytes:
    """The webhook body: the job document with the v2 response (raw JSON) under ``result``."""
    document = record.as_dict()
    document.pop("webhook", None)
    head = orjson.dumps(document)
    if result is None:
        return head
    return head[:-1] + b',"result":' + result + b"}"


class Worker:
    """``concurrency`` loops claiming and running jobs from one queue."""

    def __init__(self, queue: JobQueue, runner: Runner, *, concurrency: int = 1, name: str | None = None,
                 webhooks: WebhookSender | None = None, metrics: JobMetrics | None = None,
                 claim_block: float = 1.0, retry_backoff: float = 0.2) -> None:
        self.queue = queue
        self.runner = runner
        self.concurrency = concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.webhooks = webhooks
        self.metrics = metrics or JobMetrics()
        self.claim_block = claim_block
        self.retry_backoff = retry_backoff
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Jobs this worker executed (a job run twice after a crash counts on both workers).
        self.executed = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(f"{self.name}-{i}"), name=f"job-worker-{i}")
                       for i in range(self.concurrency)]

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; give running jobs ``timeout`` seconds, then abandon them to the queue."""
        self._stopping.set()
        if not self._tasks:
            return
        _, still = await asyncio.wait(self._tasks, timeout=timeout)
        for task in still:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if still:
            log.warning("%d job(s) abandoned at shutdown; they run again after the visibility timeout", len(still))

    async def _loop(self, consumer: str) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                claim = await self.queue.claim(consumer, self.claim_block)
                if failing:
                    log.info("job queue reachable again")
                    failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the loop must survive
                if not failing:
                    log.error("cannot claim jobs: %s (retrying)", exc)
                failing = True
                await asyncio.sleep(1.0)
                continue
            if claim is None:
                continue
            try:
                await self._process(claim, consumer)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The claim stays pending and is retried after the visibility timeout.
                log.exception("job %s: unexpected failure in the worker", claim.record.id)

    async def _process(self, claim: Claim, consumer: str) -> None:
        record = claim.record
        token = request_id_var.set(record.request_id or record.id)
        try:
            beat = asyncio.get_running_loop().create_task(self._heartbeat(claim, consumer))
            try:
                if claim.webhook_only:
                    log.info("job %s: delivering the webhook its previous worker did not", record.id)
                    result = await self.queue.result(record.id) if record.status is JobStatus.SUCCEEDED else None
                    await self._callback(claim, Outcome(record.status, result=result) if result else None)
                elif record.status is JobStatus.FAILED:  # dead-lettered as it was claimed
                    log.warning("job %s dead-lettered: %s", record.id, record.error)
                    self._observe(record)
                    await self._callback(claim)
                else:
                    await self._execute(claim)
            finally:
                await stop_task(beat)
        finally:
            request_id_var.reset(token)

    async def _execute(self, claim: Claim) -> None:
        record = claim.record
        started = time.perf_counter()
        error = ""
        try:
            outcome: Outcome | None = await self.runner.run(record, claim.payload)
        except RetryableError as exc:
            outcome, error = None, str(exc)
        except Exception as exc:  # a bug or an unexpected backend failure: retried, then dead-lettered
            log.exception("job %s: execution failed", record.id)
            outcome, error = None, f"{type(exc).__name__}: {exc}"
        finally:
            self.executed += 1
            self.metrics.execution.observe(time.perf_counter() - started)
        if outcome is None:
            self.metrics.retries += 1
            await asyncio.sleep(min(5.0, self.retry_backoff * 2 ** max(0, record.attempts - 1)))
            after = await self.queue.retry(claim, error)
            if after.status is JobStatus.FAILED:
                log.warning("job %s failed and dead-lettered: %s", record.id, after.error)
                claim.record = after
                self._observe(after)
                await self._callback(claim)
            else:
                log.info("job %s: attempt %d failed, requeued: %s", record.id, record.attempts, error)
            return
        written = await self.queue.complete(claim, outcome)
        if written:
            self._observe(claim.record)
            await self._callback(claim, outcome)
        else:
            log.info("job %s had already finished (ran more than once); result kept", record.id)

    def _observe(self, record: JobRecord) -> None:
        histogram = self.metrics.latency.get(record.status.value)
        if histogram is not None:
            histogram.observe(max(0.0, time.time() - record.created_at))

    async def _heartbeat(self, claim: Claim, consumer: str) -> None:
        interval = max(0.05, self.queue.settings.visibility_timeout / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.heartbeat(claim, consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the loop must survive
                log.warning("job %s: heartbeat failed: %s", claim.record.id, exc)

    async def _callback(self, claim: Claim, outcome: Outcome | None = None) -> None:
        """Deliver the webhook (the claim's heartbeat still runs), record the outcome, release the entry."""
        record = claim.record
        if not record.callback_url:
            return
        if self.webhooks is None:
            await self.queue.set_webhook(record.id, "failed", 0, "this worker has no webhook secret configured")
            self.metrics.webhooks["failed"] += 1
            await self.queue.ack(claim)
            return
        result = outcome.result if outcome is not None and outcome.status is JobStatus.SUCCEEDED else None
        delivery = await self.webhooks.deliver(record.callback_url, record.id, callback_body(record, result))
        self.metrics.webhooks["delivered" if delivery.delivered else "failed"] += 1
        await self.queue.set_webhook(record.id, "delivered" if delivery.delivered else "failed",
                                     delivery.attempts, delivery.error)
        await self.queue.ack(claim)


@dataclass(slots=True)
class WorkerSettings:
    """Everything ``inferstack worker`` can be told (see docs/async.md)."""

    redis_url: str
    model_repository: Path | None = None
    server_url: str | None = None
    concurrency: int = 1
    queue_prefix: str = "inferstack:jobs"
    queue: QueueSettings = field(default_factory=QueueSettings)
    webhook_secret: str | None = None
    metrics_port: int | None = None
    host: str = "0.0.0.0"
    drain_timeout: float = 30.0
    name: str | None = None


async def serve_worker(settings: WorkerSettings) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the exit code."""
    from inferstack.jobs.redis_queue import RedisJobQueue

    queue = RedisJobQueue(settings.redis_url, settings.queue, prefix=settings.queue_prefix)
    try:
        await queue.ping()
        await queue.ensure_group()
    except Exception as exc:  # noqa: BLE001 - any connection failure
        log.error("cannot reach Redis at %s: %s", settings.redis_url, exc)
        await queue.close()
        return 1
    manager = None
    runner: Runner
    if settings.server_url:
        runner = RemoteRunner(settings.server_url)
        log.info("forwarding jobs to %s", settings.server_url)
    else:
        from inferstack.serving import ModelManager, ServerOptions

        assert settings.model_repository is not None
        manager = ModelManager(ServerOptions(model_repository=settings.model_repository))
        await manager.load_startup_models()
        runner = LocalRunner(manager)
    metrics = JobMetrics()
    metrics_server = None
    if settings.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from inferstack.observability.metrics import start_metrics_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(JobCollector(metrics, settings.queue_prefix))
        if manager is not None:
            from inferstack.observability.metrics import ModelCollector

            registry.register(ModelCollector(manager))
        metrics_server = start_metrics_server(registry, settings.host, settings.metrics_port)
    refresher = metrics.start(queue)
    webhooks = WebhookSender(settings.webhook_secret) if settings.webhook_secret else None
    worker = Worker(queue, runner, concurrency=settings.concurrency, name=settings.name, webhooks=webhooks,
                    metrics=metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    worker.start()
    log.info("worker %s: %d job slot(s) on %s (queue %s)", worker.name, settings.concurrency,
             settings.redis_url, settings.queue_prefix)
    await stop.wait()
    log.info("stopping: finishing running jobs (up to %.0fs)", settings.drain_timeout)
    await worker.stop(settings.drain_timeout)
    await stop_task(refresher)
    if webhooks is not None:
        await webhooks.close()
    await runner.close()
    if manager is not None:
        await manager.shutdown()
    await queue.close()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    log.info("stopped")
    return 0


def run_worker(settings: WorkerSettings) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve_worker(settings))
