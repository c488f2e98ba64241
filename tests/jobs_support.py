"""Fixtures and helpers for the async jobs and Redis cache tests.

A real Redis: ``redis-server`` started on a free loopback port for the test
session (no persistence), stopped at the end. ``INFERSTACK_TEST_REDIS_URL``
points the tests at an existing Redis instead; every test uses its own key
prefix, and nothing is ever flushed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from inferstack.testing import onnx_models
from tests.support import MLP_CONFIG, free_port, stop_process

READY_TIMEOUT = 120.0

#: ~1 s per request on one core: long enough to kill a worker in the middle of one.
SLOW_JOB_CONFIG = """
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

#: A few ms per request: the 1,000-job run.
QUICK_CONFIG = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

CACHED_CONFIG = MLP_CONFIG.replace('name: "mlp"', 'name: "cached"') + "response_cache { enable: true }\n"


def build_jobs_repository(root: Path) -> Path:
    w = onnx_models.write_model
    w(root, "mlp", onnx_models.mlp(), MLP_CONFIG)
    w(root, "cached", onnx_models.mlp(), CACHED_CONFIG)
    w(root, "slow", onnx_models.slow_identity(4, repeats=100, size=512), SLOW_JOB_CONFIG)
    w(root, "quick", onnx_models.slow_identity(4, repeats=10, size=64), QUICK_CONFIG)
    return root


class RedisServer:
    """``redis-server`` on a free port, no persistence; stop() it."""

    def __init__(self, log_path: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start:\n{log_path.read_text()}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("INFERSTACK_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.log")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def jobs_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_jobs_repository(tmp_path_factory.mktemp("jobs-repository"))


@pytest.fixture
def queue_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


class WorkerProcess:
    """``python -m inferstack worker`` in a subprocess; kill() or stop() it."""

    def __init__(self, redis_url: str, prefix: str, *extra: str, log_path: Path, name: str,
                 repository: Path | None = None, server: str | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        source = ["--model-repository", str(repository)] if repository is not None else ["--server", str(server)]
        self.metrics_port = free_port()
        args = [sys.executable, "-m", "inferstack", "worker", "--redis-url", redis_url, "--jobs-queue", prefix,
                "--name", name, "--metrics-port", str(self.metrics_port), "--host", "127.0.0.1", *source, *extra]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_started(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the worker serves metrics (its models are loaded by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not started after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.process, self._log, timeout)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    """Start worker processes; every one is stopped after the test."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, prefix: str, *extra: str, name: str | None = None, wait: bool = True,
              **kwargs) -> WorkerProcess:
        name = name or f"w{len(started)}"
        worker = WorkerProcess(redis_url, prefix, *extra, log_path=tmp_path / f"worker-{name}.log", name=name,
                               **kwargs)
        started.append(worker)
        if wait:
            worker.wait_started()
        return worker

    yield start
    for worker in started:
        worker.stop()


class WebhookReceiver:
    """A tiny HTTP server recording callbacks; answers 500 to the first ``fail_first`` requests."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.valid: list[bytes] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append((dict(self.headers), body))
                    failing = len(receiver.requests) <= receiver.fail_first
                    expected = "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                    signed = hmac.compare_digest(expected, self.headers.get("X-Inferstack-Signature", ""))
                    if signed and not failing:
                        receiver.valid.append(body)
                self.send_response(500 if failing else (204 if signed else 401))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout}s")


def poll_job(client: httpx.Client, url: str, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed"),
             timeout: float = 60.0) -> dict:
    last: dict = {}

    def done() -> bool:
        nonlocal last
        response = client.get(f"{url}/v2/jobs/{job_id}")
        assert response.status_code == 200, response.text
        last = response.json()
        return last["status"] in statuses

    try:
        wait_for(done, timeout, 0.05, f"job {job_id} in {statuses}")
    except TimeoutError:
        raise TimeoutError(f"job {job_id} still {last}") from None
    return last
