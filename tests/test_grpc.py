"""The gRPC service, driven by NVIDIA's tritonclient.grpc (sync, asyncio and streaming)."""

from __future__ import annotations

import asyncio
import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferstack.testing.onnx_models import mlp_reference
from tests.support import ALL_DATATYPES

TIMEOUT = 60


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def inputs_for(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("broken_model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "inferstack" and "model_repository" in meta["extensions"]
    model = client.get_model_metadata("mlp", as_json=True)
    assert model["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert model["versions"] == ["1"]


def test_model_config_is_triton_model_config(client):
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 64
    assert config.input[0].name == "INPUT0" and list(config.input[0].dims) == [64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    auto = client.get_model_config("identity_int8", as_json=True)["config"]
    assert auto["max_batch_size"] == 4 and auto["input"][0]["data_type"] == "TYPE_INT8"


def test_infer_mlp_matches_reference(client):
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    result = client.infer("mlp", [inputs_for("INPUT0", x, "FP32")], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), atol=1e-4)
    assert result.get_response().id == "r-1"
    assert result.get_response().model_version == "1"


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_every_datatype_round_trips_raw(client, datatype):
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        x = np.array([[b"a", b"", "h\u00e9".encode()]], dtype=np.object_)
    elif datatype == "BOOL":
        x = rng.random((2, 3)) > 0.5
    else:
        from tritonclient.utils import triton_to_np_dtype

        dtype = np.dtype(triton_to_np_dtype(datatype))
        x = (rng.random((2, 3)) * 100).astype(dtype)
    result = client.infer(f"identity_{datatype.lower()}", [inputs_for("INPUT0", x, datatype)])
    y = result.as_numpy("OUTPUT0")
    assert y.shape == x.shape
    assert y.tolist() == x.tolist()


def test_output_subset_and_versions(client):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)
    result = client.infer("add_sub", [inputs_for("INPUT0", a, "FP32"), inputs_for("INPUT1", b, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    x = np.zeros((1, 4), dtype=np.float32)
    assert client.infer("versioned", [inputs_for("INPUT0", x, "FP32")]).as_numpy("OUTPUT0").tolist() == [[3.0] * 4]
    two = client.infer("versioned", [inputs_for("INPUT0", x, "FP32")], model_version="2")
    assert two.as_numpy("OUTPUT0").tolist() == [[2.0] * 4]


def test_typed_contents_are_accepted(server):
    """Clients other than tritonclient may send typed contents instead of raw bytes."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="identity_int32")
        tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 3])
        tensor.contents.int_contents.extend([1, -2, 3])
        response = stub.ModelInfer(request, timeout=TIMEOUT)
        assert np.frombuffer(response.raw_output_contents[0], dtype="<i4").tolist() == [1, -2, 3]
        request = service_pb2.ModelInferRequest(model_name="identity_int8")
        tensor = request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 1])
        tensor.contents.int_contents.append(300)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the range of INT8" in info.value.details()


@pytest.mark.parametrize(
    ("model", "array", "datatype", "code", "words"),
    [
        ("no_such_model", np.zeros((1, 64), np.float32), "FP32", "NOT_FOUND", ["no_such_model"]),
        ("mlp", np.zeros((1, 32), np.float32), "FP32", "INVALID_ARGUMENT", ["INPUT0", "shape"]),
        ("mlp", np.zeros((1, 64), np.float64), "FP64", "INVALID_ARGUMENT", ["INPUT0", "FP64"]),
        ("mlp", np.zeros((65, 64), np.float32), "FP32", "INVALID_ARGUMENT", ["batch size 65"]),
        ("broken_model", np.zeros((1, 4), np.float32), "FP32", "UNAVAILABLE", ["broken_model"]),
    ],
)
def test_errors_map_to_grpc_codes(client, model, array, datatype, code, words):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [inputs_for("INPUT0", array, datatype)])
    assert info.value.status() == f"StatusCode.{code}"
    for word in words:
        assert word in info.value.message()


def test_unknown_version_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("versioned", [inputs_for("INPUT0", np.zeros((1, 4), np.float32), "FP32")], model_version="1")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_raw_contents_count_mismatch_is_invalid(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="mlp")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(b"\0" * 100)  # 256 needed
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 256 bytes" in info.value.details()


def test_message_over_the_limit_is_refused_clearly(start_server, model_repository):
    small = start_server(model_repository, "--grpc-max-message-size", "4096", "--no-strict-readiness")
    with grpcclient.InferenceServerClient(small.grpc_url) as c:
        x = np.zeros((64, 64), dtype=np.float32)  # 16 KiB
        with pytest.raises(InferenceServerException) as info:
            c.infer("mlp", [inputs_for("INPUT0", x, "FP32")])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert c.is_server_live()


def test_statistics_and_repository_index(client):
    before = client.get_inference_statistics("mlp").model_stats[0]
    client.infer("mlp", [inputs_for("INPUT0", np.zeros((2, 64), np.float32), "FP32")])
    after = client.get_inference_statistics("mlp").model_stats[0]
    assert after.inference_count == before.inference_count + 2
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("mlp", "1")].state == "READY"
    assert index[("broken_model", "1")].state == "UNAVAILABLE" and index[("broken_model", "1")].reason
    with pytest.raises(InferenceServerException) as info:
        client.load_model("mlp")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "explicit" in info.value.message()


def test_streaming_answers_every_request_and_reports_errors_in_band(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = {}
        for i in range(20):
            x = np.full((1, 64), i / 20, dtype=np.float32)
            sent[f"s-{i}"] = x
            client.async_stream_infer("mlp", [inputs_for("INPUT0", x, "FP32")], request_id=f"s-{i}")
        client.async_stream_infer("mlp", [inputs_for("INPUT0", np.zeros((1, 3), np.float32), "FP32")],
                                  request_id="bad")
        results, errors = {}, []
        for _ in range(21):
            result, error = answers.get(timeout=TIMEOUT)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    assert set(results) == set(sent)
    for request_id, x in sent.items():
        np.testing.assert_allclose(results[request_id], mlp_reference(x), atol=1e-4)
    assert len(errors) == 1 and "INPUT0" in str(errors[0])


def test_asyncio_client_concurrent_requests(server):
    async def main():
        async with aioclient.InferenceServerClient(server.grpc_url) as c:
            assert await c.is_server_ready()
            rng = np.random.default_rng(11)
            xs = [rng.random((1 + i % 3, 64), dtype=np.float32) for i in range(100)]

            async def one(x):
                tensor = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                return (await c.infer("mlp", [tensor])).as_numpy("OUTPUT0")

            outputs = await asyncio.gather(*(one(x) for x in xs))
            for x, y in zip(xs, outputs):
                np.testing.assert_allclose(y, mlp_reference(x), atol=1e-4)
            config = await c.get_model_config("mlp", as_json=True)
            assert json.loads(json.dumps(config))["config"]["name"] == "mlp"

    asyncio.run(asyncio.wait_for(main(), 120))


def test_explicit_mode_load_and_unload_over_grpc(start_server, tmp_path):
    from inferstack.testing import onnx_models

    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0))
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert not c.is_model_ready("a")
        c.load_model("a")
        assert c.is_model_ready("a")
        x = np.zeros((1, 4), dtype=np.float32)
        assert c.infer("a", [inputs_for("INPUT0", x, "FP32")]).as_numpy("OUTPUT0").tolist() == [[1.0] * 4]
        override = json.dumps({"max_batch_size": 2, "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
                               "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}]})
        c.load_model("a", config=override)
        assert c.get_model_config("a").config.max_batch_size == 2
        with pytest.raises(InferenceServerException) as info:
            c.load_model("a", config="{not json")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        c.unload_model("a")
        assert not c.is_model_ready("a")
        with pytest.raises(InferenceServerException) as info:
            c.load_model("../etc")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_the_grpcio_server_still_serves_the_same_service(start_server, model_repository):
    """``--grpc-server grpcio`` (grpc.aio) carries the same servicer as the default HTTP/2 server."""
    other = start_server(model_repository, "--grpc-server", "grpcio", "--grpc-max-message-size", "4096",
                         "--no-strict-readiness")
    assert "(grpcio server)" in other.log()
    with grpcclient.InferenceServerClient(other.grpc_url) as c:
        x = np.random.rand(2, 64).astype(np.float32)
        result = c.infer("mlp", [inputs_for("INPUT0", x, "FP32")])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), rtol=1e-4, atol=1e-5)
        with pytest.raises(InferenceServerException) as info:
            c.infer("nope", [inputs_for("INPUT0", x, "FP32")])
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            c.infer("mlp", [inputs_for("INPUT0", np.zeros((64, 64), np.float32), "FP32")])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
