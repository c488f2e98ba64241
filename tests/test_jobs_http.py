"""Async inference over HTTP: the in-process queue, then Redis Streams with worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import redis

from inferstack.jobs.webhooks import verify
from inferstack.testing.onnx_models import mlp_reference
from tests.jobs_support import (  # noqa: F401 - fixtures
    WebhookReceiver,
    jobs_repository,
    poll_job,
    redis_url,
    start_worker,
    wait_for,
)
from tests.support import ServerProcess

SECRET = "test-secret"


def mlp_body(seed: int = 0, **parameters) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float32)
    document = {"inputs": [{"name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    if parameters:
        document["parameters"] = parameters
    return orjson.dumps(document), mlp_reference(x)


def identity_body(values: list[float], **parameters) -> bytes:
    document = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": values}]}
    if parameters:
        document["parameters"] = parameters
    return orjson.dumps(document)


def output(job: dict) -> np.ndarray:
    out = job["result"]["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def inprocess_server(jobs_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    log_path = tmp_path_factory.mktemp("jobs-server") / "server.log"
    server = ServerProcess(jobs_repository, "--job-workers", "1", "--webhook-secret", SECRET, log_path=log_path)
    yield server
    server.stop()


# -- in-process queue -------------------------------------------------------------------------


def test_submit_poll_result(inprocess_server: ServerProcess) -> None:
    url = inprocess_server.url
    body, expected = mlp_body(1)
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{url}/v2/models/mlp/infer/async", content=body)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["status_url"] == f"/v2/jobs/{job['id']}"
        assert response.headers["location"] == job["status_url"]
        done = poll_job(client, url, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert done["result"]["model_name"] == "mlp" and done["result"]["model_version"] == "1"
        np.testing.assert_allclose(output(done), expected, rtol=1e-4, atol=1e-5)
        assert done["expires_at"] > done["finished_at"] >= done["started_at"] >= done["created_at"]
        # Versioned route, and the synchronous fast path next to it still answers 200 itself.
        versioned = client.post(f"{url}/v2/models/mlp/versions/1/infer/async", content=body)
        assert versioned.status_code == 202
        assert poll_job(client, url, versioned.json()["id"])["result"]["model_version"] == "1"
        sync = client.post(f"{url}/v2/models/mlp/infer", content=body)
        assert sync.status_code == 200 and "outputs" in sync.json()
        # A retried submission with the same Idempotency-Key gets the first job, not a second one.
        keyed = [client.post(f"{url}/v2/models/mlp/infer/async", content=body, headers={"Idempotency-Key": "k-1"})
                 for _ in range(2)]
        assert [r.status_code for r in keyed] == [202, 202] and keyed[0].json()["id"] == keyed[1].json()["id"]
        long_key = client.post(f"{url}/v2/models/mlp/infer/async", content=body, headers={"Idempotency-Key": "k" * 256})
        assert long_key.status_code == 400 and "Idempotency-Key" in long_key.json()["error"]
        # Binary output requests still give a JSON result (it is stored, then fetched).
        binary_body, expected = mlp_body(2, binary_data_output=True)
        job = client.post(f"{url}/v2/models/mlp/infer/async", content=binary_body).json()
        np.testing.assert_allclose(output(poll_job(client, url, job["id"])), expected, rtol=1e-4, atol=1e-5)


def test_bad_requests(inprocess_server: ServerProcess) -> None:
    url = inprocess_server.url
    body, _ = mlp_body()
    with httpx.Client(timeout=30) as client:
        cases = [
            ("/v2/models/nope/infer/async", body, 404, "unknown model 'nope'"),
            ("/v2/models/mlp/versions/x1/infer/async", body, 400, "invalid model version 'x1'"),
            ("/v2/models/mlp/infer/async", b"{not json", 400, "malformed JSON"),
            ("/v2/models/mlp/infer/async", b'{"inputs": []}', 400, "'inputs' must be a non-empty list"),
            ("/v2/models/mlp/infer/async", mlp_body(callback_url="ftp://x/y")[0], 400, "callback_url"),
            ("/v2/models/mlp/infer/async", mlp_body(callback_url=5)[0], 400, "callback_url"),
            ("/v2/models/mlp/infer/async", orjson.dumps({"inputs": [{
                "name": "INPUT0", "shape": [1, 64], "datatype": "FP32",
                "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 256}}]}),
             400, "shared memory"),
        ]
        for path, content, status, message in cases:
            response = client.post(url + path, content=content)
            assert response.status_code == status, (path, response.text)
            assert message in response.json()["error"], (path, response.text)
        for method in ("GET", "DELETE"):
            response = client.request(method, f"{url}/v2/jobs/{'0' * 32}")
            assert response.status_code == 404 and "unknown job" in response.json()["error"]
        assert client.get(f"{url}/v2/jobs/not-a-job").status_code == 404
        assert client.get(f"{url}/v2/models/mlp/infer/async").status_code == 405
        # A request the model refuses (wrong shape) is accepted, then fails with the model's 400 message.
        job = client.post(f"{url}/v2/models/slow/infer/async", content=orjson.dumps({"inputs": [{
            "name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]})).json()
        failed = poll_job(client, url, job["id"])
        assert failed["status"] == "failed" and "INPUT0" in failed["error"] and "result" not in failed


def test_cancel_queued_but_not_running(inprocess_server: ServerProcess) -> None:
    url = inprocess_server.url
    with httpx.Client(timeout=30) as client:
        ids = [client.post(f"{url}/v2/models/slow/infer/async", content=identity_body([i, 0, 0, 0])).json()["id"]
               for i in range(3)]
        poll_job(client, url, ids[0], ("running",))  # one worker slot: the others wait
        response = client.delete(f"{url}/v2/jobs/{ids[2]}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        response = client.delete(f"{url}/v2/jobs/{ids[0]}")
        assert response.status_code == 409 and "running" in response.json()["error"]
        assert client.get(f"{url}/v2/jobs/{ids[2]}").json()["status"] == "cancelled"
        assert client.delete(f"{url}/v2/jobs/{ids[2]}").status_code == 409
        # Long poll: a short wait answers with the current status; a long one blocks until the job ends.
        fresh = client.post(f"{url}/v2/models/slow/infer/async", content=identity_body([7, 0, 0, 0])).json()["id"]
        started = time.monotonic()
        pending = client.get(f"{url}/v2/jobs/{fresh}", params={"wait": 0.2}).json()
        assert pending["status"] in ("queued", "running") and time.monotonic() - started >= 0.2, pending
        waited = client.get(f"{url}/v2/jobs/{fresh}", params={"wait": 30}, timeout=60).json()
        assert waited["status"] == "succeeded" and time.monotonic() - started < 25, waited
        assert waited["result"]["outputs"][0]["data"] == [7, 0, 0, 0]
        assert poll_job(client, url, ids[1])["status"] == "succeeded"
        for bad in ("soon", "-1", "61"):
            response = client.get(f"{url}/v2/jobs/{ids[1]}", params={"wait": bad})
            assert response.status_code == 400 and "'wait'" in response.json()["error"]
        assert client.get(f"{url}/v2/jobs/{ids[2]}").json()["status"] == "cancelled"  # never ran
        assert client.delete(f"{url}/v2/jobs/{ids[1]}").status_code == 409
        cancelled = 'inferstack_jobs_total{outcome="cancelled",queue="in-process"} 1.0'
        metrics = wait_for(lambda: cancelled in (m := httpx.get(inprocess_server.metrics_url).text) and m,
                           30, what="job metrics (refreshed every 2 s)")
        assert "inferstack_job_queue_length" in metrics and "inferstack_job_oldest_age_seconds" in metrics
        assert 'inferstack_job_duration_seconds_count{outcome="succeeded",queue="in-process"}' in metrics


def test_inprocess_webhook(inprocess_server: ServerProcess) -> None:
    receiver = WebhookReceiver(SECRET)
    try:
        with httpx.Client(timeout=30) as client:
            job = client.post(f"{inprocess_server.url}/v2/models/slow/infer/async",
                              content=identity_body([1, 2, 3, 4], callback_url=receiver.url)).json()
            wait_for(lambda: receiver.valid, 60, what="webhook")
            document = orjson.loads(receiver.valid[0])
            assert document["id"] == job["id"] and document["status"] == "succeeded"
            assert document["result"]["outputs"][0]["data"] == [1, 2, 3, 4]
            done = wait_for(lambda: (j := client.get(f"{inprocess_server.url}/v2/jobs/{job['id']}").json())
                            ["webhook"]["status"] == "delivered" and j, 30, what="webhook recorded")
            assert done["webhook"] == {"url": receiver.url, "status": "delivered", "attempts": 1}
    finally:
        receiver.stop()


# -- Redis Streams with workers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_prefix() -> str:
    return f"test:http:{time.monotonic_ns()}"


@pytest.fixture(scope="module")
def redis_server(jobs_repository: Path, redis_url: str, redis_prefix: str,  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server enqueueing to Redis for the module (no embedded workers: tests start their own)."""
    log_path = tmp_path_factory.mktemp("jobs-redis-server") / "server.log"
    server = ServerProcess(jobs_repository, "--jobs-redis-url", redis_url, "--jobs-queue", redis_prefix,
                           "--webhook-secret", SECRET, log_path=log_path)
    yield server
    server.stop()


def test_redis_submit_poll_webhook_retried(jobs_repository, redis_url, redis_prefix, redis_server,  # noqa: F811
                                           start_worker) -> None:  # noqa: F811
    server, queue_prefix = redis_server, redis_prefix
    receiver = WebhookReceiver(SECRET, fail_first=2)
    try:
        with httpx.Client(timeout=30) as client:
            body, expected = mlp_body(3, callback_url=receiver.url)
            job = client.post(f"{server.url}/v2/models/mlp/infer/async", content=body).json()
            assert client.get(f"{server.url}/v2/jobs/{job['id']}").json()["status"] == "queued"  # no worker yet
            start_worker(redis_url, queue_prefix, "--webhook-secret", SECRET, "--concurrency", "2",
                         repository=jobs_repository)
            done = poll_job(client, server.url, job["id"])
            assert done["status"] == "succeeded", done
            np.testing.assert_allclose(output(done), expected, rtol=1e-4, atol=1e-5)
            # The receiver failed twice (500); the third delivery went through, signed.
            wait_for(lambda: receiver.valid, 60, what="webhook")
            assert len(receiver.requests) == 3
            headers, payload = receiver.requests[-1]
            assert verify(SECRET, payload, headers["X-Inferstack-Signature"])
            assert not verify("wrong", payload, headers["X-Inferstack-Signature"])
            assert headers["X-Inferstack-Job-Id"] == job["id"]
            sent = orjson.loads(payload)
            np.testing.assert_allclose(np.asarray(sent["result"]["outputs"][0]["data"]).reshape(2, 10), expected,
                                       rtol=1e-4, atol=1e-5)
            recorded = wait_for(lambda: (j := client.get(f"{server.url}/v2/jobs/{job['id']}").json())["webhook"]
                                ["status"] == "delivered" and j, 30, what="webhook outcome")
            assert recorded["webhook"]["attempts"] == 3
            succeeded = f'inferstack_jobs_total{{outcome="succeeded",queue="{queue_prefix}"}} 1.0'
            metrics = wait_for(lambda: succeeded in (m := httpx.get(server.metrics_url).text) and m,
                               30, what="job metrics (refreshed every 2 s)")
            assert f'inferstack_job_queue_length{{queue="{queue_prefix}"}} 0.0' in metrics
    finally:
        receiver.stop()


def test_worker_forwarding_to_a_server(redis_url, redis_prefix, redis_server, start_worker) -> None:  # noqa: F811
    server, queue_prefix = redis_server, redis_prefix
    start_worker(redis_url, queue_prefix, server=server.url)
    with httpx.Client(timeout=30) as client:
        body, expected = mlp_body(4)
        job = client.post(f"{server.url}/v2/models/mlp/versions/1/infer/async", content=body).json()
        done = poll_job(client, server.url, job["id"])
        np.testing.assert_allclose(output(done), expected, rtol=1e-4, atol=1e-5)
        bad = client.post(f"{server.url}/v2/models/mlp/infer/async", content=orjson.dumps({"inputs": [{
            "name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})).json()
        failed = poll_job(client, server.url, bad["id"])
        assert failed["status"] == "failed" and "INPUT0" in failed["error"] and failed["attempts"] == 1


def test_worker_killed_mid_job_completes_elsewhere(jobs_repository, redis_url, redis_prefix, redis_server,  # noqa: F811
                                                   start_worker) -> None:  # noqa: F811
    server, queue_prefix = redis_server, redis_prefix
    timeout = ["--job-visibility-timeout", "1"]
    workers = {name: start_worker(redis_url, queue_prefix, *timeout, name=name, repository=jobs_repository,
                                  wait=False) for name in ("alpha", "beta")}
    for worker in workers.values():
        worker.wait_started()
    store = redis.Redis.from_url(redis_url)
    try:
        with httpx.Client(timeout=30) as client:
            job = client.post(f"{server.url}/v2/models/slow/infer/async", content=identity_body([4, 3, 2, 1])).json()
            poll_job(client, server.url, job["id"], ("running",))
            consumer = store.hget(f"{queue_prefix}:job:{job['id']}", "worker").decode()
            victim = consumer.rsplit("-", 1)[0]
            workers[victim].kill()  # SIGKILL in the middle of the ~1-2 s job
            started = time.monotonic()
            done = poll_job(client, server.url, job["id"], timeout=90)
            assert done["status"] == "succeeded" and done["attempts"] >= 2, done
            assert done["result"]["outputs"][0]["data"] == [4, 3, 2, 1]
            survivor = store.hget(f"{queue_prefix}:job:{job['id']}", "worker").decode()
            assert survivor.rsplit("-", 1)[0] != victim
            assert int(store.hget(f"{queue_prefix}:job:{job['id']}", "result_writes")) == 1
            assert time.monotonic() - started < 90
    finally:
        store.close()
