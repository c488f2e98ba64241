"""NVIDIA's own HTTP client, unchanged, against the server: the compatibility check.

``tritonclient.http`` is the reference implementation of the KServe v2 / Triton
HTTP protocol on the client side (binary tensor extension, statistics, the
repository index, compression); if it works with the server as it works with
Triton, Triton users can switch. (``tritonclient.grpc`` is deliberately never
imported in this test suite: its protobuf registrations clash with ours.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferstack import __version__
from inferstack.testing.onnx_models import mlp_reference
from tests.support import ServerProcess

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(
        url=f"127.0.0.1:{server.http_port}",
        connection_timeout=TIMEOUT,
        network_timeout=TIMEOUT,
        concurrency=4,
    )
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_server_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "inferstack"
    assert metadata["version"] == __version__
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("versioned", model_version="2")
    assert not client.is_model_ready("versioned", model_version="1")
    assert not client.is_model_ready("broken_model")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("mlp")
    assert metadata["name"] == "mlp"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("versioned", model_version="3")["versions"] == ["2", "3"]

    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [64]
    auto = client.get_model_config("identity_bytes")
    assert auto["max_batch_size"] == 4
    assert auto["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_mlp(client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool) -> None:
    x = np.random.default_rng(21).standard_normal((5, 64)).astype(np.float32)
    result = client.infer(
        "mlp",
        [_input("INPUT0", x, "FP32", binary_in)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)],
        request_id="mlp-1",
    )
    response = result.get_response()
    assert response["model_name"] == "mlp" and response["model_version"] == "1"
    assert response["id"] == "mlp-1"
    output = result.as_numpy("OUTPUT0")
    assert output.dtype == np.float32 and output.shape == (5, 10)
    np.testing.assert_allclose(output, mlp_reference(x), atol=1e-4)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_add_sub(client: httpclient.InferenceServerClient, binary: bool) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    inputs = [_input("INPUT0", a, "FP32", binary), _input("INPUT1", b, "FP32", binary)]
    result = client.infer("add_sub", inputs, outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary),
    ])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

    only = client.infer("add_sub", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)

    everything = client.infer("add_sub", inputs)  # no outputs named: all of them
    np.testing.assert_array_equal(everything.as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_bytes(client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool) -> None:
    x = np.array([[b"hello", b"", "h\u00e9llo \u2713".encode()], [b"a b c", b"x" * 100, b"\"quoted\""]],
                 dtype=np.object_)
    result = client.infer(
        "identity_bytes",
        [_input("INPUT0", x, "BYTES", binary_in)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)],
    )
    output = result.as_numpy("OUTPUT0")
    assert output.shape == (2, 3)
    # Binary BYTES come back as bytes; JSON ones as the strings the server wrote.
    items = [item if isinstance(item, bytes) else str(item).encode() for item in output.reshape(-1)]
    assert items == list(x.reshape(-1))


@pytest.mark.parametrize("datatype, dtype", [("INT64", np.int64), ("UINT8", np.uint8), ("FP16", np.float16),
                                             ("BOOL", np.bool_), ("FP64", np.float64)])
def test_infer_other_datatypes(client: httpclient.InferenceServerClient, datatype: str, dtype: type) -> None:
    if dtype is np.bool_:
        x = np.array([[True, False, True]])
    elif np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        x = np.array([[info.min, 0, info.max]], dtype=dtype)
    else:
        x = np.array([[-1.5, 0.0, np.finfo(dtype).max]], dtype=dtype)
    for binary in (False, True):
        result = client.infer(f"identity_{datatype.lower()}", [_input("INPUT0", x, datatype, binary)],
                              outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        output = result.as_numpy("OUTPUT0")
        assert output.dtype == x.dtype
        np.testing.assert_array_equal(output, x)


def test_async_infer(client: httpclient.InferenceServerClient) -> None:
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(12)]
    pending = [
        client.async_infer("mlp", [_input("INPUT0", x, "FP32", binary=True)],
                           outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
        for x in inputs
    ]
    for x, request in zip(inputs, pending):
        output = request.get_result(timeout=TIMEOUT).as_numpy("OUTPUT0")
        np.testing.assert_allclose(output, mlp_reference(x), atol=1e-4)


def test_versions(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    latest = client.infer("versioned", [_input("INPUT0", x, "FP32", True)])
    assert latest.get_response()["model_version"] == "3"
    np.testing.assert_array_equal(latest.as_numpy("OUTPUT0"), x + 3)
    second = client.infer("versioned", [_input("INPUT0", x, "FP32", True)], model_version="2")
    np.testing.assert_array_equal(second.as_numpy("OUTPUT0"), x + 2)


def test_compression(client: httpclient.InferenceServerClient) -> None:
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        for binary in (False, True):
            result = client.infer("mlp", [_input("INPUT0", x, "FP32", binary)],
                                  request_compression_algorithm=algorithm,
                                  response_compression_algorithm=algorithm)
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), atol=1e-4)


def test_request_parameters(client: httpclient.InferenceServerClient) -> None:
    """tritonclient sends ``timeout`` and ``priority`` as request parameters."""
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    result = client.infer("slow", [_input("INPUT0", x, "FP32", True)], timeout=30_000_000, priority=1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def test_inference_statistics(client: httpclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("add_sub")["model_stats"][0]
    a = np.ones((3, 16), dtype=np.float32)
    client.infer("add_sub", [_input("INPUT0", a, "FP32", True), _input("INPUT1", a, "FP32", True)])
    after = client.get_inference_statistics("add_sub")["model_stats"][0]
    assert after["name"] == "add_sub" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1

    everything = client.get_inference_statistics()["model_stats"]
    names = {entry["name"] for entry in everything}
    assert {"mlp", "add_sub", "versioned", "identity_bytes"} <= names
    assert "broken_model" not in names
    versioned = client.get_inference_statistics("versioned", model_version="2")["model_stats"]
    assert [(s["name"], s["version"]) for s in versioned] == [("versioned", "2")]


def test_repository_index(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(row["name"], row.get("version")): row["state"] for row in index}
    assert states[("mlp", "1")] == "READY"
    assert states[("broken_model", "1")] == "UNAVAILABLE"
    assert states[("broken_syntax", None)] == "UNAVAILABLE"


def test_errors_carry_the_server_message(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no_such_model", [_input("INPUT0", x, "FP32", True)])
    assert unknown.value.status() == "404"
    assert "unknown model 'no_such_model'" in unknown.value.message()

    bad = np.ones((1, 63), dtype=np.float32)
    for binary in (False, True):
        with pytest.raises(InferenceServerException) as shape:
            client.infer("mlp", [_input("INPUT0", bad, "FP32", binary)])
        assert shape.value.status() == "400"
        assert "'INPUT0'" in shape.value.message() and "[1, 63]" in shape.value.message()

    with pytest.raises(InferenceServerException) as output:
        client.infer("mlp", [_input("INPUT0", x, "FP32", True)],
                     outputs=[httpclient.InferRequestedOutput("NOPE")])
    assert "unknown output 'NOPE'" in output.value.message()

    with pytest.raises(InferenceServerException) as broken:
        client.infer("broken_model", [_input("INPUT0", x, "FP32", True)])
    assert broken.value.status() == "503"
    assert "broken_model" in broken.value.message()

    with pytest.raises(InferenceServerException) as metadata:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in metadata.value.message()

    with pytest.raises(InferenceServerException) as version:
        client.get_model_config("versioned", model_version="1")
    assert "version 1" in version.value.message()

    # The client still works after the errors.
    result = client.infer("mlp", [_input("INPUT0", x, "FP32", True)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), atol=1e-4)
