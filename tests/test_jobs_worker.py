"""The worker loop and webhook sender in-process: retries to the dead-letter queue, signatures, refusals."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from inferstack.core.errors import UnavailableError
from inferstack.jobs.queue import InProcessJobQueue, QueueSettings
from inferstack.jobs.redis_queue import RedisJobQueue
from inferstack.jobs.runners import RemoteRunner
from inferstack.jobs.types import JobSpec, JobStatus, Payload
from inferstack.jobs.webhooks import WebhookSender, sign, verify
from inferstack.jobs.worker import Worker
from tests.jobs_support import WebhookReceiver, queue_prefix, redis_url  # noqa: F401 - fixtures
from tests.support import free_port

BODY = b'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'


@pytest.mark.parametrize("backend", ["inprocess", "redis"])
def test_unreachable_backend_is_retried_then_dead_lettered_with_the_reason(backend, redis_url,  # noqa: F811
                                                                           queue_prefix) -> None:  # noqa: F811
    receiver = WebhookReceiver("s")

    async def main():
        settings = QueueSettings(max_attempts=2)
        queue = (InProcessJobQueue(settings) if backend == "inprocess"
                 else RedisJobQueue(redis_url, settings, prefix=queue_prefix))
        runner = RemoteRunner(f"http://127.0.0.1:{free_port()}")
        webhooks = WebhookSender("s", backoff=0.01)
        worker = Worker(queue, runner, webhooks=webhooks, claim_block=0.1, retry_backoff=0.01)
        record = await queue.submit(JobSpec(model="m", callback_url=receiver.url), Payload(BODY))
        worker.start()
        for _ in range(200):
            job = await queue.get(record.id)
            if job.status is JobStatus.FAILED and job.webhook_status in ("delivered", "failed"):
                break
            await asyncio.sleep(0.05)
        await worker.stop(5)
        await runner.close()
        await webhooks.close()
        assert job.status is JobStatus.FAILED and job.attempts == 2, job
        assert job.error.startswith("gave up after 2 attempt(s): cannot reach http://127.0.0.1:"), job.error
        dead = await queue.dead_letters()
        assert [d["id"] for d in dead] == [record.id] and dead[0]["reason"] == job.error
        assert worker.metrics.retries == 2 and worker.executed == 2
        assert job.webhook_status == "delivered"
        stats = await queue.stats()
        assert (stats.queued, stats.pending, stats.dead_letters) == (0, 0, 1)
        await queue.close()
        return record.id, job.error

    try:
        job_id, error = asyncio.run(main())
        sent = orjson.loads(receiver.valid[0])
        assert sent["id"] == job_id and sent["status"] == "failed" and sent["error"] == error
        assert "result" not in sent
    finally:
        receiver.stop()


def test_webhook_refused_is_final_and_signatures_verify() -> None:
    receiver = WebhookReceiver("right-secret")

    async def main():
        sender = WebhookSender("wrong-secret", backoff=0.01)
        refused = await sender.deliver(receiver.url, "j1", b'{"id":"j1"}')
        await sender.close()
        sender = WebhookSender("right-secret", backoff=0.01)
        accepted = await sender.deliver(receiver.url, "j2", b'{"id":"j2"}')
        unreachable = await sender.deliver(f"http://127.0.0.1:{free_port()}/h", "j3", b"{}")
        await sender.close()
        return refused, accepted, unreachable

    try:
        refused, accepted, unreachable = asyncio.run(main())
    finally:
        receiver.stop()
    assert (refused.delivered, refused.attempts, refused.error) == (False, 1, "HTTP 401")  # 4xx: not retried
    assert (accepted.delivered, accepted.attempts) == (True, 1)
    assert not unreachable.delivered and unreachable.attempts == 5 and "ConnectError" in unreachable.error
    assert verify("k", b"body", sign("k", b"body"))
    assert not verify("k", b"body!", sign("k", b"body")) and not verify("k", b"body", None)
    with pytest.raises(ValueError):
        WebhookSender("")


def test_redis_unreachable_submission_is_503() -> None:
    async def main():
        queue = RedisJobQueue(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(UnavailableError, match="Redis"):
            await queue.submit(JobSpec(model="m"), Payload(BODY))
        with pytest.raises(UnavailableError, match="Redis"):
            await queue.get("0" * 32)
        await queue.close()

    asyncio.run(main())


def test_worker_command_needs_one_source(tmp_path) -> None:
    from typer.testing import CliRunner

    from inferstack.cli import app

    runner = CliRunner(env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    neither = runner.invoke(app, ["worker", "--redis-url", "redis://127.0.0.1:1/0"])
    both = runner.invoke(app, ["worker", "--redis-url", "redis://127.0.0.1:1/0", "--model-repository",
                               str(tmp_path), "--server", "http://x"])
    for result in (neither, both):
        assert result.exit_code == 2 and "exactly one of --model-repository and --server" in result.output
    for command in (["worker", "--server", "http://x", "--redis-url"], ["serve", "--model-repository", str(tmp_path),
                                                                        "--jobs-redis-url"]):
        result = runner.invoke(app, [*command, "localhost:6379"])
        assert result.exit_code == 2 and "expected a redis://, rediss:// or unix:// URL" in result.output, result.output
