"""The jobs feature inside ``inferstack serve``: queue, embedded workers, routes, metrics.

Without ``--jobs-redis-url`` the queue is in-process and the server runs
jobs itself (``--job-workers``, default 4) through its own models. With
Redis, the server only enqueues and reports by default (workers are
separate ``inferstack worker`` processes, scaled on the queue length), unless
``--job-workers`` asks it to run some too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.routing import Route

from inferstack.core.errors import UnsupportedError
from inferstack.jobs.http import JobsApi, job_routes
from inferstack.jobs.metrics import JobCollector, JobMetrics, stop_task
from inferstack.jobs.queue import InProcessJobQueue, JobQueue, QueueSettings
from inferstack.jobs.runners import LocalRunner
from inferstack.jobs.webhooks import WebhookSender
from inferstack.jobs.worker import Worker
from inferstack.serving import ModelManager

log = logging.getLogger("inferstack.jobs")


@dataclass(slots=True)
class JobsConfig:
    redis_url: str | None = None
    queue_prefix: str = "inferstack:jobs"
    #: Embedded worker slots; None: 4 with the in-process queue, 0 with Redis.
    workers: int | None = None
    webhook_secret: str | None = None
    settings: QueueSettings | None = None
    #: Set when this process must not keep jobs of its own (``serve --workers N`` without
    #: Redis: each worker process would hold a private queue, and a status request would
    #: land on a worker that never heard of the job). The endpoints answer 400 with it.
    unavailable_reason: str | None = None


class JobService:
    def __init__(self, config: JobsConfig, manager: ModelManager) -> None:
        self.config = config
        settings = config.settings or QueueSettings()
        self.queue: JobQueue
        if config.redis_url:
            from inferstack.jobs.redis_queue import RedisJobQueue

            self.queue = RedisJobQueue(config.redis_url, settings, prefix=config.queue_prefix)
            self.name = config.queue_prefix
        else:
            self.queue = InProcessJobQueue(settings)
            self.name = "in-process"
        workers = config.workers if config.workers is not None else (0 if config.redis_url else 4)
        if config.unavailable_reason:
            workers = 0
        self.metrics = JobMetrics()
        self.webhooks = WebhookSender(config.webhook_secret) if config.webhook_secret else None
        self.worker = (Worker(self.queue, LocalRunner(manager), concurrency=workers, webhooks=self.webhooks,
                              metrics=self.metrics) if workers > 0 else None)
        self.api = JobsApi(self.queue, manager, webhooks_enabled=self.webhooks is not None)
        self._refresher = None

    def routes(self, http_api) -> list[Route]:
        if self.config.unavailable_reason:
            return unavailable_job_routes(self.config.unavailable_reason, http_api)
        return job_routes(self.api, http_api)

    def collector(self) -> JobCollector:
        return JobCollector(self.metrics, self.name)

    async def start(self) -> None:
        self._refresher = self.metrics.start(self.queue)
        if self.worker is not None:
            self.worker.start()
        log.info("async jobs: %s queue, %d embedded worker slot(s)", self.name,
                 self.worker.concurrency if self.worker else 0)

    async def stop(self, timeout: float) -> None:
        if self.worker is not None:
            await self.worker.stop(timeout)
        await stop_task(self._refresher)
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.queue.close()


def unavailable_job_routes(reason: str, http_api) -> list[Route]:
    """The job endpoints, each answering 400 with ``reason`` (see ``JobsConfig.unavailable_reason``)."""

    async def refuse(request, **_params):
        raise UnsupportedError(reason)

    h = http_api.handler
    return [
        Route("/v2/models/{model}/infer/async", h(refuse), methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer/async", h(refuse), methods=["POST"]),
        Route("/v2/jobs/{job_id}", h(refuse), methods=["GET", "DELETE"]),
    ]
