"""Ensembles through a real server: a chain and a diamond of ONNX models over tritonclient
HTTP and gRPC, validation errors as UNAVAILABLE with reasons in the repository index, a
failing step named in the error, statistics per step, and explicit-mode dependencies."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferstack.testing import onnx_models
from tests.support import ServerProcess

ADD_CONFIG = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
"""

CHAIN = """
name: "chain"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    { model_name: "add1" model_version: -1
      input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "T" } },
    { model_name: "add10" model_version: 1
      input_map { key: "INPUT0" value: "T" } output_map { key: "OUTPUT0" value: "OUT" } }
  ]
}
"""

# IN -> add1 -> T; T -> add10 -> A and T -> add100 -> B concurrently; add_sub(A, B) -> SUM, DIFF.
DIAMOND = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "DIFF" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    { model_name: "add_sub4"
      input_map [ { key: "INPUT0" value: "A" }, { key: "INPUT1" value: "B" } ]
      output_map [ { key: "OUTPUT0" value: "SUM" }, { key: "OUTPUT1" value: "DIFF" } ] },
    { model_name: "add100" input_map { key: "INPUT0" value: "T" } output_map { key: "OUTPUT0" value: "B" } },
    { model_name: "add10" input_map { key: "INPUT0" value: "T" } output_map { key: "OUTPUT0" value: "A" } },
    { model_name: "add1" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "T" } }
  ]
}
"""

# Validated at config level (no dims [4] vs [-1] problem): the input accepts any width, add1 wants 4.
LOOSE = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling { step [
  { model_name: "add1" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
"""

# An ensemble as a step: chain (+11) then add100.
NESTED = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "chain" input_map { key: "IN" value: "IN" } output_map { key: "OUT" value: "T" } },
  { model_name: "add100" input_map { key: "INPUT0" value: "T" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
"""

# add1 then a step whose model batches with a queue delay.
BATCHED = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add1" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "T" } },
  { model_name: "add1000_batched" input_map { key: "INPUT0" value: "T" } output_map { key: "OUTPUT0" value: "OUT" } }
] }
"""

# Two ensembles that are each other's step.
CYCLIC = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "%s" input_map { key: "IN" value: "IN" } output_map { key: "OUT" value: "OUT" } } ] }
"""

BAD = {
    "bad_unknown": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "no_such_model" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["step 0 (model 'no_such_model')", "unknown model 'no_such_model'"]),
    "bad_cycle": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add1" input_map { key: "INPUT0" value: "Y" } output_map { key: "OUTPUT0" value: "X" } },
  { model_name: "add10" input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "Y" } },
  { model_name: "add100" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["the steps form a cycle", "step 0 (model 'add1') -> step 1 (model 'add10') -> step 0 (model 'add1')"]),
    "bad_dtype": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "ident_int32" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["step 0 (model 'ident_int32'): input 'INPUT0' expects INT32", "tensor 'IN' (ensemble input 'IN') is FP32"]),
    "bad_shape": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add_sub" input_map [ { key: "INPUT0" value: "IN" }, { key: "INPUT1" value: "IN" } ]
    output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["step 0 (model 'add_sub'): input 'INPUT0' expects shape [-1, 16]", "has shape [-1, 4]"]),
    "bad_unmapped": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add_sub4" input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["step 0 (model 'add_sub4'): the model's required inputs ['INPUT1'] are not in the step's input_map"]),
    "bad_tensor": ("""
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add1" input_map { key: "INPUT0" value: "TYPO" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
""", ["step 0 (model 'add1'): input 'INPUT0' is mapped from tensor 'TYPO', which is neither an ensemble input"]),
}


def build_repository(root: Path) -> Path:
    w = onnx_models.write_model
    for value in (1, 10, 100):
        w(root, f"add{value}", onnx_models.add_constant(float(value)), ADD_CONFIG)
    w(root, "add_sub4", onnx_models.add_sub(4), """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
""")
    w(root, "add_sub", onnx_models.add_sub(16), "max_batch_size: 8")
    # Waits up to 100 ms to fill a batch: concurrent ensemble requests must meet in it.
    w(root, "add1000_batched", onnx_models.add_constant(1000.0), ADD_CONFIG.replace(
        "dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 100000 }"))
    w(root, "ident_int32", onnx_models.identity("INT32"), "max_batch_size: 8")
    for name, config in {"chain": CHAIN, "diamond": DIAMOND, "loose": LOOSE, "nested": NESTED, "batched": BATCHED,
                         "cyc_a": CYCLIC % "cyc_b", "cyc_b": CYCLIC % "cyc_a",
                         **{name: text for name, (text, _) in BAD.items()}}.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = build_repository(tmp_path_factory.mktemp("ensemble_repo"))
    process = ServerProcess(root, "--no-strict-readiness",
                            log_path=tmp_path_factory.mktemp("ensemble_logs") / "server.log")
    yield process
    process.stop()


def _x(rows: int = 2) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def test_chain_over_http_and_grpc(server: ServerProcess) -> None:
    x = _x(3)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        assert client.is_model_ready("chain")
        meta = client.get_model_metadata("chain")
        assert meta["platform"] == "ensemble"
        assert meta["inputs"] == [{"name": "IN", "datatype": "FP32", "shape": [-1, 4]}]
        inp = httpclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer("chain", [inp])
        np.testing.assert_allclose(result.as_numpy("OUT"), x + 11)
        assert result.get_response()["model_name"] == "chain"
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("chain", [inp], outputs=[grpcclient.InferRequestedOutput("OUT")])
        np.testing.assert_allclose(result.as_numpy("OUT"), x + 11)
        config = client.get_model_config("chain", as_json=True)["config"]
        assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["add1", "add10"]
    finally:
        client.close()


def test_diamond_runs_both_branches(server: ServerProcess) -> None:
    x = _x(2)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        inp = httpclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("diamond", [inp])
        np.testing.assert_allclose(result.as_numpy("SUM"), 2 * x + 112)
        np.testing.assert_allclose(result.as_numpy("DIFF"), np.full_like(x, -90))
        # Asking for one output runs only the steps it needs: still correct.
        only = client.infer("diamond", [inp], outputs=[httpclient.InferRequestedOutput("DIFF")])
        assert only.as_numpy("SUM") is None
        np.testing.assert_allclose(only.as_numpy("DIFF"), np.full_like(x, -90))


def test_steps_batch_across_concurrent_ensemble_requests(server: ServerProcess) -> None:
    rows = [np.full((1, 4), i, dtype=np.float32) for i in range(8)]

    def one(x: np.ndarray) -> np.ndarray:
        with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
            inp = httpclient.InferInput("IN", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("batched", [inp]).as_numpy("OUT")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, rows))
    for x, y in zip(rows, results):
        np.testing.assert_allclose(y, x + 1001)
    stats = _stats(server, "add1000_batched")
    assert stats["inference_count"] == 8
    assert stats["execution_count"] < 8, "the step's dynamic batcher must have merged some ensemble requests"
    assert _stats(server, "batched")["inference_stats"]["success"]["count"] == 8


def test_nested_ensemble(server: ServerProcess) -> None:
    x = _x(2)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        inp = httpclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("nested", [inp]).as_numpy("OUT"), x + 111)


def test_ensembles_depending_on_each_other_are_refused(server: ServerProcess) -> None:
    rows = {row["name"]: row for row in httpx.post(server.url + "/v2/repository/index", json={}, timeout=30).json()}
    assert rows["cyc_a"]["state"] == "UNAVAILABLE" and rows["cyc_b"]["state"] == "UNAVAILABLE"
    assert "ensemble 'cyc_a' depends on itself: cyc_a -> cyc_b -> cyc_a" in rows["cyc_a"]["reason"]


def test_validation_errors_are_unavailable_with_reasons(server: ServerProcess) -> None:
    index = httpx.post(server.url + "/v2/repository/index", json={}, timeout=30).json()
    rows = {row["name"]: row for row in index}
    for name, (_, fragments) in BAD.items():
        row = rows[name]
        assert row["state"] == "UNAVAILABLE", row
        for fragment in fragments:
            assert fragment in row["reason"], (name, row["reason"])
        response = httpx.post(server.url + f"/v2/models/{name}/infer", json={"inputs": []}, timeout=30)
        assert response.status_code == 503
    for name in ("chain", "diamond", "add1", "add10", "add100", "add_sub4"):
        assert rows[name]["state"] == "READY", rows[name]


def test_step_error_names_the_step(server: ServerProcess) -> None:
    x = np.zeros((1, 5), dtype=np.float32)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        inp = httpclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("loose", [inp])
        message = str(caught.value)
        assert "ensemble 'loose' step 0 (model 'add1') failed" in message
        assert "input 'INPUT0' has shape [1, 5]" in message
        assert caught.value.status() == "400"
        # The same request with the right width works.
        ok = httpclient.InferInput("IN", [1, 4], "FP32")
        ok.set_data_from_numpy(np.ones((1, 4), np.float32))
        np.testing.assert_allclose(client.infer("loose", [ok]).as_numpy("OUT"), np.full((1, 4), 2.0))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("loose", [inp])
        assert "step 0 (model 'add1') failed" in str(caught.value)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def _stats(server: ServerProcess, model: str) -> dict:
    body = httpx.get(server.url + f"/v2/models/{model}/stats", timeout=30).json()
    (entry,) = body["model_stats"]
    return entry


def test_statistics_per_step_and_for_the_ensemble(server: ServerProcess) -> None:
    before = {name: _stats(server, name)["inference_stats"]["success"]["count"]
              for name in ("chain", "add1", "add10", "add100")}
    x = _x(1)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        inp = httpclient.InferInput("IN", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(5):
            client.infer("chain", [inp])
    after = {name: _stats(server, name)["inference_stats"]["success"]["count"] for name in before}
    assert after["chain"] - before["chain"] == 5
    assert after["add1"] - before["add1"] == 5
    assert after["add10"] - before["add10"] == 5
    assert after["add100"] == before["add100"]  # not a step of the chain
    chain = _stats(server, "chain")
    assert chain["inference_stats"]["success"]["ns"] > 0
    metrics = httpx.get(server.metrics_url, timeout=30).text
    for model in ("chain", "add1", "add10"):
        line = next(line for line in metrics.splitlines()
                    if line.startswith(f'inferstack_request_success_total{{model="{model}",version="1"}}'))
        assert float(line.split()[-1]) == after[model]


def test_explicit_mode_loads_steps_and_follows_them(tmp_path: Path) -> None:
    root = build_repository(tmp_path / "repo")
    server = ServerProcess(root, "--model-control-mode", "explicit", "--load-model", "chain",
                           log_path=tmp_path / "server.log")
    try:
        index = {row["name"]: row for row in httpx.post(server.url + "/v2/repository/index", json={}).json()}
        assert index["chain"]["state"] == "READY"
        assert index["add1"]["state"] == "READY" and index["add10"]["state"] == "READY"
        assert "state" not in index["add100"]  # not a step: not loaded
        with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
            client.unload_model("add1")
            assert not client.is_model_ready("chain")
            index = {row["name"]: row for row in client.get_model_repository_index()}
            assert "step 0 (model 'add1') is not available" in index["chain"]["reason"]
            x = _x(1)
            inp = httpclient.InferInput("IN", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("chain", [inp])
            assert caught.value.status() == "503"
            client.load_model("add1")
            assert client.is_model_ready("chain")
            np.testing.assert_allclose(client.infer("chain", [inp]).as_numpy("OUT"), x + 11)
            # Loading an ensemble loads its steps, as Triton does.
            client.unload_model("add10")
            client.unload_model("chain")
            client.load_model("chain")
            assert client.is_model_ready("add10") and client.is_model_ready("chain")
    finally:
        server.stop()


def test_poll_mode_ensemble_follows_a_removed_step(tmp_path: Path) -> None:
    root = build_repository(tmp_path / "repo")
    server = ServerProcess(root, "--model-control-mode", "poll", "--repository-poll-secs", "0.3",
                           "--no-strict-readiness", log_path=tmp_path / "server.log")

    def chain_row() -> dict:
        rows = httpx.post(server.url + "/v2/repository/index", json={}, timeout=30).json()
        return next(row for row in rows if row["name"] == "chain")

    def wait(state: str) -> dict:
        deadline = time.monotonic() + 60
        while (row := chain_row())["state"] != state:
            assert time.monotonic() < deadline, f"chain never became {state}: {row}"
            time.sleep(0.1)
        return row

    try:
        wait("READY")
        shutil.move(str(root / "add10"), str(tmp_path / "add10"))
        row = wait("UNAVAILABLE")
        assert "step 1 (model 'add10') is not available" in row["reason"]
        shutil.move(str(tmp_path / "add10"), str(root / "add10"))
        wait("READY")
        body = {"inputs": [{"name": "IN", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
        response = httpx.post(server.url + "/v2/models/chain/infer", json=body, timeout=30)
        assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [11.0] * 4
    finally:
        server.stop()
