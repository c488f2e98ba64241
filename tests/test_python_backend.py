"""The Python backend end to end: tritonclient over HTTP and gRPC against Triton-style and
typed Python models, batching, per-request errors, BLS into ONNX, and worker crashes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.python_backend_support import build_python_repository
from tests.support import ServerProcess


@pytest.fixture(scope="module")
def py_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = build_python_repository(tmp_path_factory.mktemp("py_repository"))
    process = ServerProcess(repository, log_path=tmp_path_factory.mktemp("py_logs") / "server.log")
    yield process
    process.stop()


def _http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)


def _in(module, name: str, array: np.ndarray, datatype: str):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _batched(client, x: np.ndarray, **kwargs):
    return client.infer("py_batched", [_in(httpclient, "X", x, "FP32")], **kwargs)


def test_triton_add_sub_example_runs_unchanged_over_http(py_server: ServerProcess) -> None:
    client = _http(py_server)
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    b = np.array([0.5, 0.5, 5, -1], dtype=np.float32)
    result = client.infer("py_add_sub", [_in(httpclient, "INPUT0", a, "FP32"), _in(httpclient, "INPUT1", b, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    metadata = client.get_model_metadata("py_add_sub")
    assert metadata["platform"] == "python"
    assert [i["name"] for i in metadata["inputs"]] == ["INPUT0", "INPUT1"]


def test_grpc_client_against_python_models(py_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(py_server.grpc_url)
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    b = np.array([4, 3, 2, 1], dtype=np.float32)
    result = client.infer("py_add_sub", [_in(grpcclient, "INPUT0", a, "FP32"), _in(grpcclient, "INPUT1", b, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = client.infer("py_typed", [_in(grpcclient, "X", x, "FP32")])
    np.testing.assert_array_equal(typed.as_numpy("Y"), x * 3)
    with pytest.raises(InferenceServerException) as error:
        client.infer("py_typed", [_in(grpcclient, "X", np.full((1, 2), np.nan, np.float32), "FP32")])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "py_typed" in error.value.message() and "NaN" in error.value.message()
    client.close()


def test_triton_model_sees_args_request_id_parameters_and_requested_outputs(py_server: ServerProcess) -> None:
    client = _http(py_server)
    result = _batched(client, np.ones((2, 2), np.float32), request_id="req-7", parameters={"tag": "x"})
    info = json.loads(result.as_numpy("INFO")[0, 0])
    assert info["id"] == "req-7"
    assert info["instance"] == "py_batched_0_0" and info["kind"] == "CPU" and info["version"] == "1"
    assert info["repository"].endswith("py_batched") and info["model_dir"] == info["repository"]
    assert info["requested"] == ["Y", "INFO"]
    only_y = client.infer("py_batched", [_in(httpclient, "X", np.ones((1, 2), np.float32), "FP32")],
                          outputs=[httpclient.InferRequestedOutput("Y")])
    assert only_y.as_numpy("INFO") is None
    np.testing.assert_array_equal(only_y.as_numpy("Y"), np.full((1, 2), 2, np.float32))


def test_dynamic_batcher_gives_one_execute_many_requests_and_errors_stay_per_request(py_server: ServerProcess) -> None:
    client = _http(py_server)
    pending = [
        client.async_infer("py_batched", [_in(httpclient, "X", np.full((1, 2), -1.0 if i == 3 else float(i + 1),
                                                                      np.float32), "FP32")], request_id=f"r{i}")
        for i in range(8)
    ]
    results = []
    for request in pending:
        try:
            results.append(request.get_result())
        except InferenceServerException as exc:
            results.append(exc)
    failed = results[3]
    assert isinstance(failed, InferenceServerException)
    assert failed.status() == "400" and "py_batched" in str(failed) and "negative input" in str(failed)
    batch_sizes = []
    for i, result in enumerate(results):
        if i == 3:
            continue
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result.as_numpy("Y"), np.full((1, 2), 2.0 * (i + 1), np.float32))
        info = json.loads(result.as_numpy("INFO")[0, 0])
        assert info["id"] == f"r{i}"
        batch_sizes.append(info["batch_requests"])
    assert max(batch_sizes) > 1, batch_sizes  # 20 ms queue delay: concurrent requests share an execute()


def test_typed_api_predict_gets_the_concatenated_batch(py_server: ServerProcess) -> None:
    client = _http(py_server)
    pending = [client.async_infer("py_typed", [_in(httpclient, "X", np.full((rows, 3), rows, np.float32), "FP32")])
               for rows in [1, 2, 3, 1, 2, 3]]
    results = [request.get_result() for request in pending]
    totals = []
    for rows, result in zip([1, 2, 3, 1, 2, 3], results):
        np.testing.assert_array_equal(result.as_numpy("Y"), np.full((rows, 3), rows * 3, np.float32))
        assert result.as_numpy("ROWS").shape == (rows, 1)
        totals.append(int(result.as_numpy("ROWS")[0, 0]))
    assert max(totals) > 3, totals  # predict() saw more rows than any single request


def test_large_tensors_cross_shared_memory(py_server: ServerProcess) -> None:
    client = _http(py_server)
    x = np.random.default_rng(0).random((2, 600_000), dtype=np.float32)  # 4.8 MB: the arenas must grow
    result = client.infer("py_typed", [_in(httpclient, "X", x, "FP32")], outputs=[httpclient.InferRequestedOutput("Y", binary_data=True)])
    np.testing.assert_allclose(result.as_numpy("Y"), x * 3)


def test_model_errors_name_the_model_and_leave_it_serving(py_server: ServerProcess) -> None:
    client = _http(py_server)
    with pytest.raises(InferenceServerException) as error:
        _batched(client, np.ones((1, 2), np.float32), parameters={"raise": True})
    assert error.value.status() == "500"
    assert "py_batched" in str(error.value) and "asked to raise" in str(error.value)
    with pytest.raises(InferenceServerException) as error:
        client.infer("py_typed", [_in(httpclient, "X", np.full((1, 2), 1e7, np.float32), "FP32")])
    assert error.value.status() == "500"
    assert "py_typed" in str(error.value) and "RuntimeError: value too large" in str(error.value)
    with pytest.raises(InferenceServerException) as error:
        _batched(client, np.ones((1, 2), np.float32), parameters={"wrong_dtype": True})
    assert error.value.status() == "500"
    assert "output 'Y' has datatype FP64, the config declares FP32" in str(error.value)
    np.testing.assert_array_equal(_batched(client, np.ones((1, 2), np.float32)).as_numpy("Y"), [[2, 2]])


def test_bls_calls_an_onnx_model_through_the_server(py_server: ServerProcess) -> None:
    client = _http(py_server)
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 2, np.float32)
    target = np.array([b"onnx_add_sub"], dtype=np.object_)
    inputs = [_in(httpclient, "A", a, "FP32"), _in(httpclient, "B", b, "FP32"), _in(httpclient, "TARGET", target, "BYTES")]
    result = client.infer("py_bls", inputs)
    np.testing.assert_array_equal(result.as_numpy("SUM"), (a + b) + (a - b))
    result = client.infer("py_bls_async", inputs)
    np.testing.assert_array_equal(result.as_numpy("SUM"), (a + b) + (a - b))
    stats = client.get_inference_statistics("onnx_add_sub")["model_stats"][0]["inference_stats"]
    assert int(stats["success"]["count"]) >= 1  # it went through the ONNX model's own scheduler
    inputs[2] = _in(httpclient, "TARGET", np.array([b"no_such_model"], dtype=np.object_), "BYTES")
    with pytest.raises(InferenceServerException) as error:
        client.infer("py_bls", inputs)
    assert "py_bls" in str(error.value) and "no_such_model" in str(error.value)


@pytest.mark.slow
def test_worker_crash_under_load_is_restarted_and_other_models_keep_serving(py_server: ServerProcess) -> None:
    client = _http(py_server)
    pid_before = json.loads(_batched(client, np.ones((1, 2), np.float32)).as_numpy("INFO")[0, 0])["pid"]
    stop = threading.Event()
    other_results: list[object] = []

    grpc = grpcclient.InferenceServerClient(py_server.grpc_url)  # thread-safe, unlike the HTTP client

    def hammer() -> None:
        x = np.ones((1, 16), np.float32)
        while not stop.is_set():
            try:
                r = grpc.infer("onnx_add_sub", [_in(grpcclient, "INPUT0", x, "FP32"), _in(grpcclient, "INPUT1", x, "FP32")])
                other_results.append(float(r.as_numpy("OUTPUT0")[0, 0]))
                t = grpc.infer("py_typed", [_in(grpcclient, "X", np.ones((1, 2), np.float32), "FP32")])
                other_results.append(float(t.as_numpy("Y")[0, 0]))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                other_results.append(exc)

    def victim(i: int):
        x = np.ones((1, 2), np.float32)
        try:
            return grpc.infer("py_batched", [_in(grpcclient, "X", x, "FP32")],
                              parameters={"sleep": "0.05"} if i % 2 else {})
        except InferenceServerException as exc:
            return exc

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for crash in ("segfault", "exit"):
            with ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(victim, i) for i in range(4)]
                time.sleep(0.02)
                with pytest.raises(InferenceServerException) as error:
                    _batched(client, np.ones((1, 2), np.float32), parameters={"crash": crash})
                [f.result() for f in in_flight]  # in flight with the crash: each an answer or an error
            message = str(error.value)
            assert error.value.status() == "500" and "py_batched" in message
            assert ("SIGSEGV" in message) if crash == "segfault" else ("code 3" in message), message
            deadline = time.monotonic() + 60
            while True:  # back to READY and serving, on a new worker
                try:
                    result = _batched(client, np.ones((1, 2), np.float32))
                    break
                except InferenceServerException:
                    assert time.monotonic() < deadline, "the worker was not restarted"
                    time.sleep(0.2)
            np.testing.assert_array_equal(result.as_numpy("Y"), [[2, 2]])
            pid_after = json.loads(result.as_numpy("INFO")[0, 0])["pid"]
            assert pid_after != pid_before
            pid_before = pid_after
            assert client.is_model_ready("py_batched")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        grpc.close()
    errors = [r for r in other_results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert len(other_results) > 10
    assert httpx.get(f"{py_server.url}/v2/health/ready").status_code == 200
    assert "restarting it" in py_server.log()


def test_worker_killed_while_idle_is_restarted(py_server: ServerProcess) -> None:
    client = _http(py_server)
    pid = json.loads(_batched(client, np.ones((1, 2), np.float32)).as_numpy("INFO")[0, 0])["pid"]
    os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer, between requests
    deadline = time.monotonic() + 60
    while True:
        try:
            result = _batched(client, np.ones((1, 2), np.float32))
            new_pid = json.loads(result.as_numpy("INFO")[0, 0])["pid"]
            if new_pid != pid:
                break
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.1)
    assert client.is_model_ready("py_batched")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
