"""The job queue contract, for both backends: in-process and Redis Streams (a real redis-server)."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferstack.core.errors import NotFoundError
from inferstack.jobs.queue import InProcessJobQueue, QueueSettings
from inferstack.jobs.redis_queue import RedisJobQueue
from inferstack.jobs.types import ConflictError, JobSpec, JobStatus, Outcome, Payload
from tests.jobs_support import queue_prefix, redis_url  # noqa: F401 - fixtures

BODY = b'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["inprocess", "redis"])
def make_queue(request, redis_url, queue_prefix):  # noqa: F811
    def make(**settings):
        qs = QueueSettings(**settings)
        if request.param == "inprocess":
            return InProcessJobQueue(qs)
        return RedisJobQueue(redis_url, qs, prefix=queue_prefix)

    return make


def submit(queue, model="m", payload=BODY, **kwargs):
    return queue.submit(JobSpec(model=model, **kwargs), Payload(payload))


def test_submit_claim_complete_exactly_once(make_queue) -> None:
    async def main():
        queue = make_queue()
        record = await submit(queue, version="2", callback_url="http://example.invalid/h")
        assert record.status is JobStatus.QUEUED
        got = await queue.get(record.id)
        assert got.status is JobStatus.QUEUED and got.model == "m" and got.version == "2"
        assert got.webhook_status == "pending"
        assert (await queue.stats()).queued == 1
        claim = await queue.claim("c1", 1.0)
        assert claim is not None and claim.payload.body == BODY and claim.payload.header_length is None
        assert claim.record.attempts == 1
        assert (await queue.get(record.id)).status is JobStatus.RUNNING
        stats = await queue.stats()
        assert (stats.queued, stats.pending) == (0, 1) and stats.oldest_age >= 0
        assert await queue.claim("c2", 0.1) is None  # nothing else to run
        assert await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b'{"ok":1}'))
        # The same job completed again (a second run after a takeover) writes nothing.
        assert not await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b'{"ok":2}'))
        done = await queue.get(record.id)
        assert done.status is JobStatus.SUCCEEDED and done.result_writes == 1 and done.finished_at
        assert await queue.result(record.id) == b'{"ok":1}'
        stats = await queue.stats()
        assert (stats.queued, stats.pending) == (0, 0) and stats.outcomes.get("succeeded") == 1
        await queue.set_webhook(record.id, "delivered", 2, "")
        hooked = await queue.get(record.id)
        assert (hooked.webhook_status, hooked.webhook_attempts) == ("delivered", 2)
        assert await queue.get("0" * 32) is None
        await queue.close()

    run(main())


def test_cancel(make_queue) -> None:
    async def main():
        queue = make_queue()
        first = await submit(queue)
        second = await submit(queue)
        claim = await queue.claim("c1", 1.0)
        assert claim.record.id == first.id
        with pytest.raises(ConflictError, match="running"):
            await queue.cancel(first.id)
        cancelled = await queue.cancel(second.id)
        assert cancelled.status is JobStatus.CANCELLED
        with pytest.raises(ConflictError, match="cancelled"):
            await queue.cancel(second.id)
        with pytest.raises(NotFoundError):
            await queue.cancel("f" * 32)
        assert await queue.claim("c1", 0.2) is None  # the cancelled job is never handed out
        assert (await queue.stats()).outcomes.get("cancelled") == 1
        await queue.complete(claim, Outcome(JobStatus.FAILED, error="bad input", error_status=400))
        failed = await queue.get(first.id)
        assert failed.status is JobStatus.FAILED and failed.error == "bad input" and failed.error_status == 400
        with pytest.raises(ConflictError, match="failed"):
            await queue.cancel(first.id)
        await queue.close()

    run(main())


def test_stale_claim_is_taken_over_and_heartbeat_keeps_it(make_queue) -> None:
    async def main():
        queue = make_queue(visibility_timeout=0.3)
        kept = await submit(queue)
        lost = await submit(queue)
        kept_claim = await queue.claim("alive", 1.0)
        lost_claim = await queue.claim("dead", 1.0)
        assert {kept_claim.record.id, lost_claim.record.id} == {kept.id, lost.id}
        for _ in range(6):  # "alive" heartbeats, "dead" does not
            await asyncio.sleep(0.1)
            await queue.heartbeat(kept_claim, "alive")
        taken = await queue.claim("other", 1.0)
        assert taken is not None and taken.record.id == lost_claim.record.id and taken.record.attempts == 2
        assert await queue.claim("other", 0.2) is None  # the heartbeaten one stays with "alive"
        # Both runs of the lost job finish: the first completion wins, the second is refused.
        assert await queue.complete(taken, Outcome(JobStatus.SUCCEEDED, result=b"first"))
        assert not await queue.complete(lost_claim, Outcome(JobStatus.SUCCEEDED, result=b"second"))
        assert await queue.result(lost_claim.record.id) == b"first"
        assert (await queue.get(lost_claim.record.id)).result_writes == 1
        await queue.close()

    run(main())


def test_poison_job_is_dead_lettered_after_max_attempts(make_queue) -> None:
    async def main():
        queue = make_queue(visibility_timeout=0.1, max_attempts=3)
        record = await submit(queue)
        for attempt in range(1, 4):  # every worker that takes it "dies" (never completes)
            claim = await queue.claim(f"w{attempt}", 1.0)
            assert claim is not None and claim.record.attempts == attempt
            await asyncio.sleep(0.2)
        final = await queue.claim("w4", 1.0)
        assert final is not None and final.record.status is JobStatus.FAILED  # dead-lettered, not run
        job = await queue.get(record.id)
        assert job.status is JobStatus.FAILED and "gave up after 3 attempt(s)" in job.error
        assert "visibility timeout" in job.error and job.result_writes == 1
        dead = await queue.dead_letters()
        assert [d["id"] for d in dead] == [record.id] and "gave up after 3" in dead[0]["reason"]
        stats = await queue.stats()
        assert stats.dead_letters == 1 and stats.outcomes.get("dead_lettered") == 1
        assert (stats.queued, stats.pending) == (0, 0)
        assert await queue.claim("w5", 0.2) is None
        await queue.close()

    run(main())


def test_retryable_failures_requeue_then_dead_letter(make_queue) -> None:
    async def main():
        queue = make_queue(max_attempts=2)
        record = await submit(queue)
        claim = await queue.claim("w", 1.0)
        after = await queue.retry(claim, "503: model 'm' is not ready")
        assert after.status is JobStatus.QUEUED
        claim = await queue.claim("w", 1.0)
        assert claim.record.attempts == 2
        after = await queue.retry(claim, "503: model 'm' is not ready")
        assert after.status is JobStatus.FAILED
        assert after.error == "gave up after 2 attempt(s): 503: model 'm' is not ready"
        assert [d["id"] for d in await queue.dead_letters()] == [record.id]
        await queue.close()

    run(main())


def test_results_expire(make_queue) -> None:
    async def main():
        queue = make_queue(result_ttl=0.3, record_retention=30)
        record = await submit(queue)
        claim = await queue.claim("w", 1.0)
        await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b"{}"))
        assert (await queue.get(record.id)).visible_status() is JobStatus.SUCCEEDED
        assert await queue.result(record.id) == b"{}"
        await asyncio.sleep(0.5)
        expired = await queue.get(record.id)
        assert expired is not None and expired.visible_status() is JobStatus.EXPIRED
        assert expired.as_dict()["status"] == "expired"
        assert await queue.result(record.id) is None
        await queue.close()

    run(main())


def test_binary_payload_is_stored_once_and_intact(make_queue) -> None:
    async def main():
        queue = make_queue()
        body = b'{"x":1}' + bytes(range(256)) * 40
        record = await queue.submit(JobSpec(model="m"), Payload(body, 7))
        claim = await queue.claim("w", 1.0)
        assert claim.payload.body == body and claim.payload.header_length == 7
        await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b"{}"))
        if isinstance(queue, RedisJobQueue):  # the payload is deleted once the job ends
            assert not await queue.client.exists(f"{queue.prefix}:payload:{record.id}")
            assert await queue.client.xlen(queue.stream) == 0
        await queue.close()

    run(main())


def test_oldest_age(make_queue) -> None:
    async def main():
        queue = make_queue()
        await submit(queue)
        await asyncio.sleep(0.3)
        await submit(queue)
        stats = await queue.stats()
        assert stats.queued == 2 and 0.25 <= stats.oldest_age < 30
        await queue.close()

    started = time.monotonic()
    run(main())
    assert time.monotonic() - started < 30


def test_webhook_of_a_job_whose_worker_died_after_finishing_is_redelivered(redis_url, queue_prefix) -> None:  # noqa: F811
    """Redis keeps a job with a callback pending until its webhook is out: a worker dying in between
    leaves the delivery (not the execution) to the next worker."""

    async def main():
        queue = RedisJobQueue(redis_url, QueueSettings(visibility_timeout=0.2), prefix=queue_prefix)
        record = await submit(queue, callback_url="http://example.invalid/h")
        plain = await submit(queue)
        claim = await queue.claim("dies", 1.0)
        other = await queue.claim("lives", 1.0)
        assert await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b'{"r":1}'))
        assert await queue.complete(other, Outcome(JobStatus.SUCCEEDED, result=b'{"r":2}'))
        assert (await queue.stats()).pending == 1  # only the one waiting for its webhook
        await asyncio.sleep(0.4)  # "dies" never delivered it
        again = await queue.claim("next", 1.0)
        assert again is not None and again.webhook_only and again.record.id == record.id
        assert again.record.status is JobStatus.SUCCEEDED and again.record.result_writes == 1
        await queue.set_webhook(record.id, "delivered", 1, "")
        await queue.ack(again)
        await asyncio.sleep(0.4)
        assert await queue.claim("next", 0.3) is None
        stats = await queue.stats()
        assert (stats.queued, stats.pending) == (0, 0) and stats.outcomes["succeeded"] == 2
        assert (await queue.get(plain.id)).webhook_status == ""
        await queue.close()

    run(main())


def test_idempotency_key_returns_the_first_job(make_queue) -> None:
    async def main():
        queue = make_queue()
        first = await submit(queue, idempotency_key="order-17")
        again = await submit(queue, idempotency_key="order-17", payload=b"{}")
        other_model = await submit(queue, model="n", idempotency_key="order-17")
        no_key = [await submit(queue), await submit(queue)]
        assert again.id == first.id and other_model.id != first.id and no_key[0].id != no_key[1].id
        assert (await queue.stats()).queued == 4
        claim = await queue.claim("w", 1.0)
        assert claim.record.id == first.id and claim.payload.body == BODY  # the first payload, not the retry's
        await queue.complete(claim, Outcome(JobStatus.SUCCEEDED, result=b"{}"))
        replay = await submit(queue, idempotency_key="order-17")
        assert replay.id == first.id and replay.status is JobStatus.SUCCEEDED
        await queue.close()

    run(main())
