"""The server process as a whole: CLI, example repository, control modes, logs, shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from inferstack.testing import onnx_models
from tests.support import SLOW_CONFIG

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "model_repository"


def inflight(server, model: str) -> float:
    metrics = httpx.get(server.metrics_url, timeout=30).text
    prefix = f'inferstack_inflight_requests{{model="{model}",version="1"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def succeeded(server, model: str) -> int:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=30).json()
    return stats["model_stats"][0]["inference_stats"]["success"]["count"]


def infer_body(values: np.ndarray) -> dict:
    return {"inputs": [{"name": "INPUT0", "shape": list(values.shape), "datatype": "FP32",
                        "data": values.reshape(-1).tolist()}]}


def test_cli_help_lists_the_triton_style_flags():
    result = subprocess.run([sys.executable, "-m", "inferstack", "serve", "--help"],
                            capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert result.returncode == 0
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--host",
                 "--model-control-mode", "--load-model", "--strict-model-config", "--log-level",
                 "--log-format"):
        assert flag in result.stdout


def test_example_repository_serves_the_mlp(start_server):
    server = start_server(EXAMPLES)
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    response = httpx.post(f"{server.url}/v2/models/mlp/infer", json=infer_body(x), timeout=30)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, 10), onnx_models.mlp_reference(x), atol=1e-4)
    index = httpx.post(f"{server.url}/v2/repository/index", timeout=30).json()
    assert {row["name"] for row in index if row.get("state") == "READY"} >= {"mlp", "add_sub", "identity_bytes"}


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path: Path, start_server):
    onnx_models.write_model(tmp_path, "slow", onnx_models.slow_identity(4, repeats=6000),
                            SLOW_CONFIG % "max_queue_delay_microseconds: 0")
    server = start_server(tmp_path)
    results: list[httpx.Response | Exception] = []

    def call(i: int) -> None:
        x = np.full((1, 4), i, dtype=np.float32)
        try:
            results.append(httpx.post(f"{server.url}/v2/models/slow/infer", json=infer_body(x), timeout=120))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    # Wait until every request is inside the server, then ask it to stop.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if inflight(server, "slow") + succeeded(server, "slow") >= 6:
            break
        time.sleep(0.01)
    assert inflight(server, "slow") >= 1, "requests finished before the test could stop the server"
    server.terminate()
    for thread in threads:
        thread.join(120)
    assert server.process.wait(120) == 0
    assert len(results) == 6
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
    log = server.log()
    assert "UNLOADING" in log and "stopped" in log


def test_explicit_mode_loads_only_named_models_and_the_api_loads_more(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0))
    onnx_models.write_model(tmp_path, "b", onnx_models.add_constant(2.0))
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "a")
    assert httpx.get(f"{server.url}/v2/models/a/ready", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/v2/models/b/ready", timeout=30).status_code != 200
    load = httpx.post(f"{server.url}/v2/repository/models/b/load", timeout=60)
    assert load.status_code == 200, load.text
    x = np.zeros((1, 4), dtype=np.float32)
    out = httpx.post(f"{server.url}/v2/models/b/infer", json=infer_body(x), timeout=30).json()
    assert out["outputs"][0]["data"] == [2.0] * 4
    unload = httpx.post(f"{server.url}/v2/repository/models/b/unload", timeout=60)
    assert unload.status_code == 200, unload.text
    gone = httpx.post(f"{server.url}/v2/models/b/infer", json=infer_body(x), timeout=30)
    assert gone.status_code == 503
    missing = httpx.post(f"{server.url}/v2/repository/models/nope/load", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    escape = httpx.post(f"{server.url}/v2/repository/models/..%2F..%2Fetc/load", timeout=30)
    assert escape.status_code in (400, 404)


def test_load_api_refused_outside_explicit_mode(server):
    response = httpx.post(f"{server.url}/v2/repository/models/mlp/load", timeout=30)
    assert response.status_code == 400 and "explicit" in response.json()["error"]


def test_strict_model_config_refuses_models_without_config(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "noconfig", onnx_models.identity("FP32"))
    onnx_models.write_model(tmp_path, "mlp", onnx_models.mlp(), """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
""")
    server = start_server(tmp_path, "--strict-model-config", wait_ready=False)
    server.wait_live()
    # Strict readiness: one model failed, so the server never becomes ready ...
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        index = httpx.post(f"{server.url}/v2/repository/index", timeout=30).json()
        if all(row.get("state") in ("READY", "UNAVAILABLE") for row in index) and len(index) == 2:
            break
        time.sleep(0.1)
    states = {row["name"]: row for row in index}
    assert states["mlp"]["state"] == "READY"
    assert states["noconfig"]["state"] == "UNAVAILABLE"
    assert "strict-model-config" in states["noconfig"]["reason"]
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 503
    # ... while the good model serves.
    assert httpx.get(f"{server.url}/v2/models/mlp/ready", timeout=30).status_code == 200


def test_json_logs_carry_request_ids_and_state_changes(start_server, tmp_path: Path):
    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0))
    server = start_server(tmp_path, "--log-format", "json")
    response = httpx.post(f"{server.url}/v2/models/a/infer", json={"inputs": []},
                          headers={"x-request-id": "req-42"}, timeout=30)
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "req-42"
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(r.get("model") == "a" and r.get("state") == "READY" for r in records)
    assert any(r["request_id"] == "req-42" and "400" in r["message"] for r in records)


def test_http_port_in_use_exits_cleanly_with_an_error(tmp_path: Path):
    import socket

    from tests.support import free_port

    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "inferstack", "serve", "--model-repository", str(tmp_path),
             "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port()),
             "--metrics-port", str(free_port())],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "HTTP server stopped unexpectedly" in result.stderr
    assert "stopped" in result.stderr.splitlines()[-1]
