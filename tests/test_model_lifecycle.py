"""Model lifecycle through the real server: poll mode, hot reload under load with zero
failed requests, failed loads, unload freeing memory, warmup, path safety and load
requests with a config override."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferstack.testing import onnx_models
from tests.support import ServerProcess

TIMEOUT = 120.0
POLL = "0.3"  # seconds between repository scans in poll-mode tests
CONSTANT_CONFIG = """
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: %d }
instance_group [ { count: %d } ]
"""
ZEROS = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
# The hammered model takes 256 KiB per request, sent as binary tensor data: a body that
# size arrives in several reads, so the server awaits between looking the model up and
# submitting the request, which is where a reload can retire the version it looked up.
HAMMER_DIMS = 64 * 1024


def _binary_body(rows: int = 1, dims: int = HAMMER_DIMS) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": [rows, dims], "datatype": "FP32",
                    "parameters": {"binary_data_size": rows * dims * 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    return header + bytes(rows * dims * 4), {"Inference-Header-Content-Length": str(len(header)),
                                             "Content-Type": "application/octet-stream"}


def _first_binary_value(response: httpx.Response) -> float:
    length = int(response.headers["Inference-Header-Content-Length"])
    return float(np.frombuffer(response.content[length:length + 4], dtype=np.float32)[0])


def wait_for(what: str, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def index(server: ServerProcess) -> dict[tuple[str, str | None], dict]:
    rows = httpx.post(f"{server.url}/v2/repository/index", timeout=TIMEOUT).json()
    return {(row["name"], row.get("version")): row for row in rows}


def config(server: ServerProcess, model: str) -> dict:
    response = httpx.get(f"{server.url}/v2/models/{model}/config", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def constant(server: ServerProcess, model: str, version: str = "") -> float:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    response = httpx.post(server.url + path, json=ZEROS, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"][0]


def load(server: ServerProcess, model: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{model}/load", json=body, timeout=TIMEOUT)


def unload(server: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{model}/unload", timeout=TIMEOUT)


class Hammer:
    """``clients`` threads sending requests back to back (each its own keep-alive
    connection) until stopped; records every answer with the time it was sent."""

    def __init__(self, server: ServerProcess, model: str, clients: int = 8) -> None:
        self.url = f"{server.url}/v2/models/{model}/infer"
        self.ready_url = f"{server.url}/v2/health/ready"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[tuple[float, float]] = []  # (sent at, constant returned)
        self.failures: list[str] = []
        self.not_ready = 0
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._readiness, daemon=True))

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        wait_for("the first answers", lambda: len(self.answers) >= 20)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)

    def _client(self) -> None:
        body, headers = _binary_body()
        with httpx.Client(timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(self.url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    outcome: float | str = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        outcome = _first_binary_value(response)
                    else:
                        outcome = f"{response.status_code}: {response.text}"
                with self._lock:
                    if isinstance(outcome, str):
                        self.failures.append(outcome)
                    else:
                        self.answers.append((sent, outcome))

    def _readiness(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                if client.get(self.ready_url).status_code != 200:
                    self.not_ready += 1
                time.sleep(0.05)

    def count(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.failures)

    def keep_going(self, requests: int) -> None:
        """Until ``requests`` more requests were answered."""
        target = self.count() + requests
        wait_for(f"{requests} more requests", lambda: self.count() >= target)

    def values(self, since: float = 0.0) -> Counter[float]:
        with self._lock:
            return Counter(value for sent, value in self.answers if sent >= since)


def _log_lines(server: ServerProcess, pattern: str) -> list[str]:
    return [line for line in server.log().splitlines() if re.search(pattern, line)]


# -- poll mode ----------------------------------------------------------------------------------------


def test_poll_mode_loads_reloads_and_unloads_what_changed(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0), CONSTANT_CONFIG % (0, 1))
    onnx_models.write_model(tmp_path, "steady", onnx_models.add_constant(5.0), CONSTANT_CONFIG % (0, 1))
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", POLL)
    assert constant(server, "steady") == 5.0
    # Added: loaded.
    onnx_models.write_model(tmp_path, "b", onnx_models.add_constant(2.0), CONSTANT_CONFIG % (0, 1))
    wait_for("b to load", lambda: httpx.get(f"{server.url}/v2/models/b/ready", timeout=TIMEOUT).status_code == 200)
    assert constant(server, "b") == 2.0
    # Changed config: reloaded with the new settings.
    (tmp_path / "a" / "config.pbtxt").write_text(CONSTANT_CONFIG % (700, 2))
    wait_for("a's new config", lambda: config(server, "a")["dynamic_batching"]["max_queue_delay_microseconds"] == 700)
    assert len(config(server, "a")["instance_group"]) == 1 and config(server, "a")["instance_group"][0]["count"] == 2
    # A new version: rolled to.
    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(10.0), versions=(2,))
    wait_for("a version 2", lambda: constant(server, "a") == 10.0)
    # Removed: unloaded.
    shutil.rmtree(tmp_path / "b")
    wait_for("b to unload", lambda: index(server).get(("b", None), {}).get("reason") == "unloaded")
    assert httpx.post(f"{server.url}/v2/models/b/infer", json=ZEROS, timeout=TIMEOUT).status_code == 503
    # A broken config: not retried every scan, and what served keeps serving, with the reason shown.
    (tmp_path / "a" / "config.pbtxt").write_text("max_batch_size: [")
    wait_for("the failed reload", lambda: "reload failed" in index(server)[("a", "2")]["reason"])
    assert constant(server, "a") == 10.0
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=TIMEOUT).status_code == 200
    time.sleep(1.0)  # a few scans
    assert len(_log_lines(server, r"model a: new configuration rejected")) == 1
    # The model nobody touched was loaded once and kept its statistics.
    assert len(_log_lines(server, r"model steady version 1: READY")) == 1
    stats = httpx.get(f"{server.url}/v2/models/steady/stats", timeout=TIMEOUT).json()
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 1
    assert server.stop() == 0


# -- hot reload under load --------------------------------------------------------------------------


def _hammered_model(repository: Path) -> None:
    onnx_models.write_model(repository, "m", onnx_models.add_constant(1.0, HAMMER_DIMS), CONSTANT_CONFIG % (0, 1))


def _reload_scenarios(server: ServerProcess, repository: Path, model: str, poll: bool) -> dict[str, int]:
    """(a) a config rewrite, (b) a version roll from 1 to 2, each under full load."""
    config_path = repository / model / "config.pbtxt"
    with Hammer(server, model) as hammer:
        # (a) The config changes (batching delay, instance count): reloaded under load, 4 times.
        for delay, count in ((300, 2), (0, 1), (100, 3), (0, 1)):
            # Atomically (as a deployment tool should): a poll scan must not read a half-written file.
            staged = repository.parent / f"{repository.name}-staged-config.pbtxt"  # outside the scanned tree
            staged.write_text(CONSTANT_CONFIG % (delay, count))
            os.replace(staged, config_path)
            if not poll:
                response = load(server, model)
                assert response.status_code == 200, response.text

            def applied(delay: int = delay, count: int = count) -> bool:
                effective = config(server, model)
                return (effective["instance_group"][0]["count"] == count
                        and effective["dynamic_batching"]["max_queue_delay_microseconds"] == delay)

            wait_for(f"config {delay}us/{count} instances", applied)
            hammer.keep_going(100)
        assert set(hammer.values()) == {1.0}

        # (b) Version 2 (a different constant) appears, then version 1 disappears.
        onnx_models.write_model(repository, model, onnx_models.add_constant(2.0, HAMMER_DIMS), versions=(2,))
        if not poll:
            assert load(server, model).status_code == 200
        wait_for("version 1 retired", lambda: (model, "1") not in index(server))
        rolled = time.monotonic()
        shutil.rmtree(repository / model / "1")
        if not poll:
            assert load(server, model).status_code == 200
        hammer.keep_going(300)
        if poll:
            time.sleep(float(POLL) * 3)  # the removal is seen and changes nothing that serves
            hammer.keep_going(100)
    assert hammer.failures == [], hammer.failures[:5]
    assert set(hammer.values()) <= {1.0, 2.0}
    assert hammer.values()[2.0] > 0
    assert set(hammer.values(since=rolled)) == {2.0}, "a request sent after the roll got version 1"
    assert hammer.not_ready == 0, "readiness dropped during a reload"
    rows = index(server)
    assert rows[(model, "2")]["state"] == "READY" and (model, "1") not in rows
    return {"sent": len(hammer.answers) + len(hammer.failures), "failed": len(hammer.failures)}


@pytest.mark.slow
def test_hot_reload_in_poll_mode_fails_no_request(start_server, tmp_path: Path):
    _hammered_model(tmp_path)
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", POLL)
    counts = _reload_scenarios(server, tmp_path, "m", poll=True)
    print(f"poll mode: {counts['sent']} requests, {counts['failed']} failed")
    # Each reload drained its old version and logged it.
    assert len(_log_lines(server, r"model m version 1: UNLOADING")) >= 2


@pytest.mark.slow
def test_hot_reload_by_explicit_load_fails_no_request(start_server, tmp_path: Path):
    _hammered_model(tmp_path)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    counts = _reload_scenarios(server, tmp_path, "m", poll=False)
    print(f"explicit mode: {counts['sent']} requests, {counts['failed']} failed")
    # Loading again with nothing changed reloads nothing.
    assert load(server, "m").status_code == 200
    assert len(_log_lines(server, r"model m: nothing changed")) >= 2


# -- failed loads ------------------------------------------------------------------------------------


def test_a_failed_load_leaves_what_was_serving(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONSTANT_CONFIG % (0, 1))
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    # A config that does not parse.
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: [")
    response = load(server, "m")
    assert response.status_code == 400 and "config.pbtxt" in response.json()["error"]
    assert constant(server, "m") == 1.0
    row = index(server)[("m", "1")]
    assert row["state"] == "READY" and "reload failed, previous configuration still serving" in row["reason"]
    # A config the model contradicts.
    (tmp_path / "m" / "config.pbtxt").write_text(
        'max_batch_size: 16 input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] } ]')
    response = load(server, "m")
    assert response.status_code == 400 and "TYPE_INT32" in response.json()["error"]
    assert constant(server, "m") == 1.0
    # A new version whose file does not load: version 1 keeps serving; the index says why.
    (tmp_path / "m" / "config.pbtxt").write_text(CONSTANT_CONFIG % (0, 1))
    onnx_models.write_model(tmp_path, "m", b"not an onnx model", versions=(2,))
    response = load(server, "m")
    assert response.status_code == 400 and "version 2" in response.json()["error"]
    assert constant(server, "m") == 1.0
    rows = index(server)
    assert rows[("m", "1")]["state"] == "READY"
    assert rows[("m", "2")]["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in rows[("m", "2")]["reason"]
    assert httpx.get(f"{server.url}/v2/models/m/versions/2/ready", timeout=TIMEOUT).status_code == 503
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=TIMEOUT).status_code == 200
    # Fixed: version 2 takes over, version 1 goes.
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(onnx_models.add_constant(2.0))
    assert load(server, "m").status_code == 200
    assert constant(server, "m") == 2.0
    assert ("m", "1") not in index(server)


# -- unload frees memory -----------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_load_unload_cycles_do_not_leak(start_server, tmp_path: Path):
    # ~8.4 MB of weights per instance, two instances: a leak of one load per cycle would
    # add up to hundreds of MB over 40 cycles.
    onnx_models.write_model(tmp_path, "big", onnx_models.mlp(1024, 2048, 10), """
max_batch_size: 8
dynamic_batching { }
instance_group [ { count: 2 } ]
""")
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    x = {"inputs": [{"name": "INPUT0", "shape": [2, 1024], "datatype": "FP32", "data": [0.5] * 2048}]}
    rss: dict[int, float] = {}
    for cycle in range(1, 51):
        response = load(server, "big")
        assert response.status_code == 200, response.text
        inferred = httpx.post(f"{server.url}/v2/models/big/infer", json=x, timeout=TIMEOUT)
        assert inferred.status_code == 200, inferred.text
        assert unload(server, "big").status_code == 200
        if cycle in (1, 10, 20, 30, 40, 50):
            rss[cycle] = _rss_mb(server.process.pid)
    print("RSS (MB) after cycles: " + ", ".join(f"{c}: {v:.0f}" for c, v in rss.items()))
    # RSS swings by ~30 MB from cycle to cycle (allocator arenas, ORT's CPU arena): compare
    # the highest late sample with the highest early one. A leak of even 2 MB per cycle (a
    # quarter of one instance's weights) adds 80 MB over the last 40 cycles.
    assert max(rss[40], rss[50]) - max(rss[1], rss[10]) < 80, rss


# -- warmup ------------------------------------------------------------------------------------------


def _warmup(dims: int, count: int) -> str:
    return (f'model_warmup [ {{ name: "sample" batch_size: 1 count: {count} inputs {{ key: "INPUT0" '
            f'value: {{ data_type: TYPE_FP32 dims: [ {dims} ] random_data: true }} }} }} ]\n')


def test_warmup_runs_before_the_model_is_ready(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "slow", onnx_models.slow_identity(4, repeats=2000),
                            "max_batch_size: 4\n" + _warmup(4, 20))
    server = start_server(tmp_path, wait_ready=False)
    seen: Counter[str] = Counter()
    while httpx.get(f"{server.url}/v2/models/slow/ready", timeout=TIMEOUT).status_code != 200:
        seen["not ready"] += 1
        row = index(server).get(("slow", None))
        if row is not None:
            seen[row.get("state", "")] += 1
        assert server.process.poll() is None
        time.sleep(0.05)
    assert seen["not ready"] > 0 and seen["LOADING"] > 0, seen
    log = server.log()
    (warmup_line,) = _log_lines(server, r"model slow version 1: warmup ran 1 sample\(s\) on 1 instance\(s\) in")
    (ready_line,) = _log_lines(server, r"model slow version 1: READY \(loaded in .*, warmup")
    assert log.index(warmup_line) < log.index(ready_line)
    warmup_seconds = float(re.search(r"in ([0-9.]+)s", warmup_line).group(1))
    metrics = httpx.get(server.metrics_url, timeout=TIMEOUT).text
    (gauge,) = [line for line in metrics.splitlines() if line.startswith('inferstack_model_load_seconds{model="slow"')]
    assert float(gauge.rsplit(" ", 1)[1]) >= warmup_seconds
    x = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    response = httpx.post(f"{server.url}/v2/models/slow/infer", json=x, timeout=TIMEOUT)
    assert response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_a_bad_warmup_makes_the_version_unavailable(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "bad", onnx_models.add_constant(1.0), "max_batch_size: 4\n" + _warmup(3, 1))
    onnx_models.write_model(tmp_path, "good", onnx_models.add_constant(1.0), "max_batch_size: 4\n" + _warmup(4, 2))
    server = start_server(tmp_path, "--no-strict-readiness")
    row = index(server)[("bad", "1")]
    assert row["state"] == "UNAVAILABLE"
    assert "warmup sample 'sample' is invalid" in row["reason"] and "shape [1, 3]" in row["reason"]
    response = httpx.post(f"{server.url}/v2/models/bad/infer", json=ZEROS, timeout=TIMEOUT)
    assert response.status_code == 503 and "warmup" in response.json()["error"]
    assert constant(server, "good") == 1.0


# -- path safety ---------------------------------------------------------------------------------------


def _raw_post(server: ServerProcess, path: str, body: bytes = b"") -> tuple[int, dict]:
    """POST with the path sent exactly as given (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=TIMEOUT)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_model_names_and_versions_never_leave_the_repository(start_server, tmp_path: Path):
    repository, outside = tmp_path / "repo", tmp_path / "outside"
    onnx_models.write_model(repository, "m", onnx_models.add_constant(1.0), CONSTANT_CONFIG % (0, 1))
    onnx_models.write_model(outside, "real", onnx_models.add_constant(9.0), CONSTANT_CONFIG % (0, 1))
    (repository / "evil").symlink_to(outside / "real")  # a model directory linking out
    (repository / "evil_version").mkdir()
    (repository / "evil_version" / "config.pbtxt").write_text(CONSTANT_CONFIG % (0, 1))
    (repository / "evil_version" / "1").symlink_to(outside / "real" / "1")  # a version linking out
    onnx_models.write_model(repository, "evil_file", b"", CONSTANT_CONFIG % (0, 1))
    (repository / "evil_file" / "1" / "model.onnx").unlink()
    (repository / "evil_file" / "1" / "model.onnx").symlink_to(outside / "real" / "1" / "model.onnx")
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "m")

    for path in (
        "/v2/repository/models/..%2F..%2Foutside%2Freal/load",
        "/v2/repository/models/..%2Foutside/load",
        "/v2/repository/models/%2E%2E/load",
        "/v2/repository/models/%2Fetc/load",
        "/v2/repository/models/%2Ftmp%2Fx/unload",
        "/v2/repository/models/m%00/load",
        "/v2/repository/models/.hidden/load",
    ):
        status, body = _raw_post(server, path)
        assert status == 400, (path, status, body)
        assert "invalid model name" in body["error"], (path, body)
    for name in ("evil", "evil_version", "evil_file"):
        response = load(server, name)
        assert response.status_code == 400, (name, response.text)
        assert "resolves outside the repository" in response.json()["error"], response.text
        rows = [r for key, r in index(server).items() if key[0] == name]
        assert rows and not any(r.get("state") == "READY" for r in rows), rows
    # Model and version names in inference URLs are checked the same way.
    assert _raw_post(server, "/v2/models/%2E%2E/infer", json.dumps(ZEROS).encode())[0] == 400
    status, body = _raw_post(server, "/v2/models/m/versions/%C2%B2/infer", json.dumps(ZEROS).encode())
    assert status == 400 and "not a number" in body["error"]
    # A config override cannot point the backend or the warmup outside either.
    for override, why in (
        ({"max_batch_size": 16, "default_model_filename": "../../outside/real/1/model.onnx"}, "not a path"),
        ({"max_batch_size": 16, "default_model_filename": "/etc/passwd"}, "not a path"),
        ({"max_batch_size": 16, "model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"INPUT0": {
            "data_type": "TYPE_FP32", "dims": [4], "input_data_file": "../../../outside/real/1/model.onnx"}}}]},
         "inside the model's warmup/ folder"),
    ):
        response = load(server, "m", {"parameters": {"config": json.dumps(override)}})
        assert response.status_code == 400 and why in response.json()["error"], response.text
    assert constant(server, "m") == 1.0  # still the repository's own model


# -- load with a config override ------------------------------------------------------------------------


def test_load_with_a_config_override(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONSTANT_CONFIG % (0, 1))
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    assert config(server, "m")["max_batch_size"] == 16
    override = {"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 50}}
    response = load(server, "m", {"parameters": {"config": json.dumps(override)}})
    assert response.status_code == 200, response.text
    effective = config(server, "m")
    assert effective["max_batch_size"] == 2
    assert effective["dynamic_batching"]["max_queue_delay_microseconds"] == 50
    assert effective["input"][0]["name"] == "INPUT0"  # auto-completed from the model as usual
    three = {"inputs": [{"name": "INPUT0", "shape": [3, 4], "datatype": "FP32", "data": [0.0] * 12}]}
    response = httpx.post(f"{server.url}/v2/models/m/infer", json=three, timeout=TIMEOUT)
    assert response.status_code == 400 and "max_batch_size 2" in response.json()["error"]

    for body, why in (
        ({"parameters": {"config": "{not json"}}, "malformed JSON"),
        ({"parameters": {"config": json.dumps({"max_batch_size": 2, "no_such_field": 1})}}, "no_such_field"),
        ({"parameters": {"config": json.dumps({"max_batch_size": -1})}}, "max_batch_size must be >= 0"),
        ({"parameters": {"config": json.dumps({"max_batch_size": 2, "input": [
            {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [4]}]})}}, "TYPE_INT32"),
        ({"parameters": {"config": json.dumps({"name": "other"})}}, "does not match"),
        ({"parameters": {"config": 5}}, "must be a JSON string"),
    ):
        response = load(server, "m", body)
        assert response.status_code == 400, (body, response.text)
        assert why in response.json()["error"], (why, response.text)
        # What served keeps serving, with the override it was loaded with.
        assert config(server, "m")["max_batch_size"] == 2
        assert constant(server, "m") == 1.0
    # A load without an override goes back to config.pbtxt.
    assert load(server, "m").status_code == 200
    assert config(server, "m")["max_batch_size"] == 16
