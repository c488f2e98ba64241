"""``inferstack serve --workers N``: worker processes sharing the ports, merged metrics,
restarts, clean shutdown and the settings that cannot be shared."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inferstack.testing import onnx_models
from inferstack.workers import merge_expositions
from tests.support import MLP_CONFIG

REQUESTS = 200


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers-repo")
    onnx_models.write_model(root, "mlp", onnx_models.mlp(), MLP_CONFIG)
    return root


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return None


def _worker_pids(metrics_url: str) -> dict[str, int]:
    """Worker index -> pid, from the supervisor's ``inferstack_worker`` series."""
    text = httpx.get(metrics_url, timeout=10).text
    return {worker: int(pid) for pid, worker in re.findall(r'inferstack_worker\{pid="(\d+)",worker="(\d+)"\}', text)}


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_workers_share_ports_and_merge_metrics(mlp_repository: Path, start_server) -> None:
    server = start_server(mlp_repository, "--workers", "2")
    pids = {}
    _wait_for(lambda: len(pids.update(_worker_pids(server.metrics_url)) or pids) == 2, what="2 workers in metrics")
    assert len(set(pids.values())) == 2 and server.process.pid not in pids.values()

    body = {"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    expected = onnx_models.mlp_reference(np.full((1, 64), 0.5, dtype=np.float32))

    def http_requests(_: int) -> int:
        ok = 0
        # A new connection per client: SO_REUSEPORT spreads connections, not requests.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(REQUESTS // 4):
                response = client.post("/v2/models/mlp/infer", json=body)
                assert response.status_code == 200, response.text
                out = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, -1)
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
                ok += 1
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(http_requests, range(4))) == REQUESTS

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        data = np.full((1, 64), 0.5, dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
        inp.set_data_from_numpy(data)
        for _ in range(20):
            result = client.infer("mlp", [inp])
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-5, atol=1e-5)
    finally:
        client.close()

    # The public metrics port is the sum over the workers: every request counted once.
    text = httpx.get(server.metrics_url, timeout=10).text
    assert _metric(text, "inferstack_request_success_total", model="mlp", version="1") == REQUESTS + 20
    assert _metric(text, "inferstack_model_ready", model="mlp", version="1") == 1.0
    assert _metric(text, "inferstack_workers") == 2.0
    count = _metric(text, "inferstack_request_duration_seconds_count", model="mlp", version="1")
    assert count == REQUESTS + 20
    # Both workers took connections (each answered with its own metrics port).
    per_worker = []
    for line in server.log().splitlines():
        if "metrics on http://127.0.0.1:" in line and str(server.metrics_port) not in line:
            per_worker.append(line)
    assert len(per_worker) >= 2, server.log()

    # Async jobs need a shared queue across workers: refused with the reason, not lost.
    response = httpx.post(server.url + "/v2/models/mlp/infer/async", json=body, timeout=30)
    assert response.status_code == 400
    assert "--jobs-redis-url" in response.json()["error"]

    assert server.stop() == 0
    for pid in pids.values():
        assert not _alive(pid), f"worker {pid} outlived the supervisor"


def test_dead_worker_is_restarted(mlp_repository: Path, start_server) -> None:
    server = start_server(mlp_repository, "--workers", "2")
    pids: dict[str, int] = {}
    _wait_for(lambda: len(pids.update(_worker_pids(server.metrics_url)) or pids) == 2, what="2 workers")
    victim = pids["0"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = _worker_pids(server.metrics_url)
        return len(now) == 2 and victim not in now.values()

    _wait_for(replaced, timeout=90, what="worker 0 restarted")
    text = httpx.get(server.metrics_url, timeout=10).text
    assert _metric(text, "inferstack_worker_restarts_total") == 1.0
    assert f"worker 0 (pid {victim}) exited with signal SIGKILL" in server.log()
    server.wait_ready()
    # The server keeps answering (connections land on either worker).
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    for _ in range(10):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/v2/models/mlp/infer", json=body).status_code == 200
    assert server.stop() == 0


@pytest.mark.parametrize("flags, message", [
    (["--model-control-mode", "explicit"], "explicit cannot be used with --workers > 1"),
    (["--allow-client-shm"], "--allow-client-shm cannot be used with --workers > 1"),
])
def test_settings_that_cannot_be_shared_are_refused(mlp_repository: Path, flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inferstack", "serve", "--model-repository", str(mlp_repository),
         "--host", "127.0.0.1", "--workers", "2", *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    # typer prints the message in a box; drop the frame and the line wrapping.
    assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout + result.stderr).split())


def test_worker_that_cannot_start_makes_the_supervisor_give_up(tmp_path: Path) -> None:
    # Every worker fails at once: a non-reuseport socket already holds the HTTP port.
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        (tmp_path / "repo").mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "inferstack", "serve", "--model-repository", str(tmp_path / "repo"),
             "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0",
             "--workers", "2"],
            capture_output=True, text=True, timeout=240,
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "cannot serve HTTP" in output
    assert "workers keep failing at start-up; giving up" in output


def test_merge_expositions_sums_counters_and_takes_min_of_readiness() -> None:
    worker = """# HELP inferstack_request_success Inference requests that succeeded.
# TYPE inferstack_request_success counter
inferstack_request_success_total{model="m",version="1"} %d
# HELP inferstack_model_ready 1 if READY.
# TYPE inferstack_model_ready gauge
inferstack_model_ready{model="m",version="1"} %d
# HELP inferstack_pending_requests Queue.
# TYPE inferstack_pending_requests gauge
inferstack_pending_requests{model="m",version="1"} %d
# HELP inferstack_batch_size Samples per execution.
# TYPE inferstack_batch_size histogram
inferstack_batch_size_bucket{model="m",version="1",le="1.0"} %d
inferstack_batch_size_bucket{model="m",version="1",le="+Inf"} %d
inferstack_batch_size_count{model="m",version="1"} %d
inferstack_batch_size_sum{model="m",version="1"} %d
"""
    merged = {f.name: f for f in merge_expositions([worker % (3, 1, 2, 1, 3, 3, 5), worker % (4, 0, 5, 2, 2, 2, 2)])}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in merged.values() for s in f.samples}
    key = (("model", "m"), ("version", "1"))
    assert value[("inferstack_request_success_total", key)] == 7
    assert value[("inferstack_model_ready", key)] == 0  # not ready in every worker
    assert value[("inferstack_pending_requests", key)] == 7
    assert value[("inferstack_batch_size_count", key)] == 5
    assert value[("inferstack_batch_size_sum", key)] == 7
    assert value[("inferstack_batch_size_bucket", tuple(sorted((*key, ("le", "+Inf")))))] == 5
    assert merged["inferstack_batch_size"].type == "histogram"
