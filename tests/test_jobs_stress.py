"""1,000 jobs, two worker processes, random SIGKILLs: no job lost, every result written exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import orjson
import pytest

from inferstack.jobs import payload as payloads
from inferstack.jobs.queue import QueueSettings
from inferstack.jobs.redis_queue import RedisJobQueue
from inferstack.jobs.types import JobSpec, JobStatus
from inferstack.testing import onnx_models
from tests.jobs_support import QUICK_CONFIG, queue_prefix, redis_url, start_worker  # noqa: F401 - fixtures

JOBS = 1000


def body(i: int) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                     "data": [i, i + 0.5, -i, 1]}]})


@pytest.mark.slow
def test_no_job_lost_with_random_kills(tmp_path: Path, redis_url, queue_prefix, start_worker) -> None:  # noqa: F811
    repository = tmp_path / "repository"
    # ~10 ms a job: enough in flight at every kill, the whole run in seconds.
    onnx_models.write_model(repository, "work", onnx_models.slow_identity(4, repeats=30, size=128),
                            QUICK_CONFIG)
    settings = QueueSettings(visibility_timeout=1.0, max_attempts=10)
    worker_args = ("--job-visibility-timeout", "1", "--job-max-attempts", "10", "--concurrency", "4")

    async def submit_all() -> list[str]:
        queue = RedisJobQueue(redis_url, settings, prefix=queue_prefix)
        ids = []
        for i in range(JOBS):
            payload, _ = payloads.prepare(body(i), None, "work", "")
            ids.append((await queue.submit(JobSpec(model="work"), payload)).id)
        await queue.close()
        return ids

    ids = asyncio.run(submit_all())
    rng = random.Random(7)
    workers = [start_worker(redis_url, queue_prefix, *worker_args, name=f"w{i}", repository=repository, wait=False)
               for i in range(2)]
    for worker in workers:
        worker.wait_started()

    async def finished() -> int:
        queue = RedisJobQueue(redis_url, settings, prefix=queue_prefix)
        stats = await queue.stats()
        await queue.close()
        return stats.outcomes.get("succeeded", 0) + stats.outcomes.get("failed", 0)

    # Kills are driven by progress, not by the clock: a fast, quiet machine may run the
    # whole queue in a couple of seconds, and the test must kill mid-run there too.
    kill_at = [25, 150, 300, 450, 600, 750]
    kills, spawned = 0, 2
    deadline = time.monotonic() + 150
    while (done := asyncio.run(finished())) < JOBS:
        assert time.monotonic() < deadline, "jobs not finished in time:\n" + workers[-1].log()[-3000:]
        time.sleep(0.05)
        if kills < len(kill_at) and kill_at[kills] <= done < JOBS - 50:
            index = rng.randrange(len(workers))
            workers[index].kill()
            kills += 1
            workers[index] = start_worker(redis_url, queue_prefix, *worker_args, name=f"w{spawned}",
                                          repository=repository, wait=False)
            spawned += 1
    assert kills >= 2, "the jobs finished before the workers could be killed"

    async def check() -> tuple[int, int]:
        queue = RedisJobQueue(redis_url, settings, prefix=queue_prefix)
        total_attempts = rerun = 0
        for i, job_id in enumerate(ids):
            record = await queue.get(job_id)
            assert record is not None and record.status is JobStatus.SUCCEEDED, (i, record)
            assert record.result_writes == 1, (i, record)
            result = orjson.loads(await queue.result(job_id))
            assert result["outputs"][0]["data"] == [i, i + 0.5, -i, 1], (i, result)
            total_attempts += record.attempts
            rerun += record.attempts > 1
        stats = await queue.stats()
        assert stats.outcomes.get("succeeded") == JOBS and not stats.outcomes.get("failed")
        assert (stats.queued, stats.pending, stats.dead_letters) == (0, 0, 0)
        assert await queue.client.xlen(queue.stream) == 0
        await queue.close()
        return total_attempts, rerun

    total_attempts, rerun = asyncio.run(check())
    # Kills landed mid-job: some jobs ran again on another worker, and still wrote one result.
    assert total_attempts > JOBS and rerun > 0, (total_attempts, rerun, kills)
