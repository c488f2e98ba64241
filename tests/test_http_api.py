"""The KServe v2 / Triton HTTP API end to end, with httpx against a real server subprocess.

Covers metadata, health, readiness, configs, inference in JSON and with the
binary tensor extension for every datatype, versions, statistics, the
repository index, Prometheus metrics, and behaviour under load: concurrent
requests each getting their own answer, batches really forming, clients that
disconnect, a full queue and queue timeouts.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from inferstack import __version__
from inferstack.testing.onnx_models import mlp_reference
from tests.support import ALL_DATATYPES, ServerProcess

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _parse_bytes_tensor(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset:offset + length])
        offset += length
    assert offset == len(raw)
    return items


def json_input(name: str, array: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    data = [x.decode() for x in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def binary_request(inputs: list[tuple[str, np.ndarray, str]], **document: Any) -> tuple[bytes, dict[str, str]]:
    """A body with every input as binary tensor data, and its headers."""
    entries, chunks = [], []
    for name, array, datatype in inputs:
        raw = _bytes_tensor(list(array.reshape(-1))) if datatype == "BYTES" else array.tobytes()
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                        "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    header = orjson.dumps({"inputs": entries, **document})
    return header + b"".join(chunks), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


def decode_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON document of an infer response and its outputs as arrays (JSON or binary)."""
    assert response.status_code == 200, response.text
    header_length = response.headers.get("inference-header-content-length")
    content = response.content
    if header_length is None:
        assert response.headers["content-type"].startswith("application/json")
        document, binary = orjson.loads(content), b""
    else:
        assert response.headers["content-type"] == "application/octet-stream"
        document, binary = orjson.loads(content[:int(header_length)]), content[int(header_length):]
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for output in document["outputs"]:
        datatype, shape = output["datatype"], output["shape"]
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in output
            raw = binary[offset:offset + size]
            assert len(raw) == size
            offset += size
            if datatype == "BYTES":
                array = np.empty(len(_parse_bytes_tensor(raw)), dtype=np.object_)
                array[:] = _parse_bytes_tensor(raw)
            else:
                array = np.frombuffer(raw, dtype=np.dtype(_NUMPY[datatype]).newbyteorder("<"))
        elif datatype == "BYTES":
            array = np.empty(len(output["data"]), dtype=np.object_)
            array[:] = [item.encode() for item in output["data"]]
        else:
            array = np.array(output["data"], dtype=_NUMPY[datatype])
        outputs[output["name"]] = array.reshape(shape)
    assert offset == len(binary), "binary data that belongs to no output"
    return document, outputs


def infer(client: httpx.Client, model: str, body: dict[str, Any], version: str = "") -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return client.post(path, json=body)


def stats(client: httpx.Client, model: str) -> dict[str, Any]:
    response = client.get(f"/v2/models/{model}/stats")
    assert response.status_code == 200, response.text
    [entry] = response.json()["model_stats"]
    return entry


def _sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that exercise each type's range, including its extremes."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool).reshape(shape)
    if datatype == "BYTES":
        words = [b"", b"hello", "h\u00e9llo \u2713".encode(), b"a\x00b", b"x" * 300, b"\t\n\"\\"]
        array = np.empty(count, dtype=np.object_)
        array[:] = [words[i % len(words)] for i in range(count)]
        return array.reshape(shape)
    dtype = np.dtype(_NUMPY[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        values[:2] = [info.min, info.max]
        return values.reshape(shape)
    values = rng.standard_normal(count).astype(dtype) * dtype.type(100)
    values[:3] = [np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0]
    return values.reshape(shape)


# -- server ---------------------------------------------------------------------------------


def test_server_metadata(client: httpx.Client) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["name"] == "inferstack"
    assert metadata["version"] == __version__
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(metadata["extensions"])


def test_health(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_request_id_header(client: httpx.Client) -> None:
    response = client.get("/v2/health/live", headers={"x-request-id": "trace-77"})
    assert response.headers["x-request-id"] == "trace-77"
    first = client.get("/v2").headers["x-request-id"]
    second = client.get("/v2").headers["x-request-id"]
    assert first and second and first != second


# -- models ---------------------------------------------------------------------------------


def test_model_metadata_batching(client: httpx.Client) -> None:
    response = client.get("/v2/models/mlp")
    assert response.status_code == 200
    assert response.json() == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/models/mlp/versions/1").json() == response.json()


def test_model_metadata_non_batching_and_reshaped(client: httpx.Client) -> None:
    nobatch = client.get("/v2/models/identity_nobatch").json()
    assert nobatch["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 3]}]
    assert nobatch["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 3]}]
    reshaped = client.get("/v2/models/reshaped").json()  # clients see dims, not the reshape
    assert reshaped["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 2, 2]}]
    assert reshaped["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 2, 2]}]


def test_model_metadata_auto_completed(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/identity_int16").json()
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "INT16", "shape": [-1, -1]}]
    assert metadata["platform"] == "onnxruntime_onnx"


def test_model_metadata_versions(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/versioned").json()
    assert metadata["versions"] == ["2", "3"]
    assert client.get("/v2/models/versioned/versions/2").json()["versions"] == ["2", "3"]


@pytest.mark.parametrize(
    ("path", "status", "ready"),
    [
        ("/v2/models/mlp/ready", 200, True),
        ("/v2/models/mlp/versions/1/ready", 200, True),
        ("/v2/models/versioned/versions/2/ready", 200, True),
        ("/v2/models/versioned/versions/1/ready", 503, False),  # on disk, outside the policy
        ("/v2/models/broken_model/ready", 503, False),
        ("/v2/models/broken_syntax/ready", 503, False),
        ("/v2/models/wrong_config/ready", 503, False),
    ],
)
def test_model_ready(client: httpx.Client, path: str, status: int, ready: bool) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.json()["ready"] is ready


def test_model_ready_unknown(client: httpx.Client) -> None:
    response = client.get("/v2/models/no_such_model/ready")
    assert response.status_code == 404
    assert "no_such_model" in response.json()["error"]


def test_model_config_explicit(client: httpx.Client) -> None:
    response = client.get("/v2/models/mlp/config")
    assert response.status_code == 200
    config = response.json()
    assert config["name"] == "mlp"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 64
    [input0] = config["input"]
    assert input0["name"] == "INPUT0"
    assert input0["data_type"] == "TYPE_FP32"
    assert input0["dims"] == [64] and isinstance(input0["dims"][0], int)  # numbers, not strings
    [output0] = config["output"]
    assert output0["data_type"] == "TYPE_FP32" and output0["dims"] == [10]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000


def test_model_config_versions_and_queue_policy(client: httpx.Client) -> None:
    versioned = client.get("/v2/models/versioned/versions/2/config").json()
    assert versioned["version_policy"] == {"latest": {"num_versions": 2}}
    assert versioned["max_batch_size"] == 8
    policy = client.get("/v2/models/slow_small_queue/config").json()["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == 2


def test_model_config_reshape_and_nobatch(client: httpx.Client) -> None:
    reshaped = client.get("/v2/models/reshaped/config").json()
    assert reshaped["input"][0]["dims"] == [2, 2]
    assert reshaped["input"][0]["reshape"] == {"shape": [4]}
    nobatch = client.get("/v2/models/identity_nobatch/config").json()
    assert nobatch["max_batch_size"] == 0
    assert nobatch["input"][0]["dims"] == [2, 3]


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_model_config_auto_completed(client: httpx.Client, datatype: str) -> None:
    """No config.pbtxt: completed from the ONNX graph like Triton does (batching, max 4)."""
    response = client.get(f"/v2/models/identity_{datatype.lower()}/config")
    assert response.status_code == 200
    config = response.json()
    config_type = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    assert config["name"] == f"identity_{datatype.lower()}"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 4
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [("INPUT0", config_type, [-1])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("OUTPUT0", config_type, [-1])]


# -- inference: JSON --------------------------------------------------------------------------


def test_infer_json_flat(client: httpx.Client) -> None:
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    document, outputs = decode_response(infer(client, "mlp", {"inputs": [json_input("INPUT0", x)]}))
    assert document["model_name"] == "mlp" and document["model_version"] == "1"
    assert "id" not in document
    [entry] = document["outputs"]
    assert entry["name"] == "OUTPUT0" and entry["datatype"] == "FP32" and entry["shape"] == [3, 10]
    np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(x), atol=1e-4)


def test_infer_json_nested_data(client: httpx.Client) -> None:
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 64], "data": x.tolist()}]}
    _, outputs = decode_response(infer(client, "mlp", body))
    np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(x), atol=1e-4)


def test_infer_id_is_echoed(client: httpx.Client) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    document, _ = decode_response(infer(client, "mlp", {"id": "request-42", "inputs": [json_input("INPUT0", x)]}))
    assert document["id"] == "request-42"


def test_infer_output_subset(client: httpx.Client) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    body = {"inputs": [json_input("INPUT0", a), json_input("INPUT1", b)], "outputs": [{"name": "OUTPUT1"}]}
    document, outputs = decode_response(infer(client, "add_sub", body))
    assert [o["name"] for o in document["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)

    for requested in (None, []):  # no list, or an empty one: every output (as Triton does)
        body = {"inputs": [json_input("INPUT0", a), json_input("INPUT1", b)]}
        if requested is not None:
            body["outputs"] = requested
        document, outputs = decode_response(infer(client, "add_sub", body))
        assert sorted(o["name"] for o in document["outputs"]) == ["OUTPUT0", "OUTPUT1"]
        np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
        np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


def test_infer_mixed_binary_and_json_outputs(client: httpx.Client) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)
    body = {
        "inputs": [json_input("INPUT0", a), json_input("INPUT1", b)],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}},
                    {"name": "OUTPUT1", "parameters": {"binary_data": False}}],
    }
    document, outputs = decode_response(infer(client, "add_sub", body))
    by_name = {o["name"]: o for o in document["outputs"]}
    assert by_name["OUTPUT0"]["parameters"] == {"binary_data_size": 64}
    assert "data" in by_name["OUTPUT1"]
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


def test_infer_binary_inputs_for_two_inputs(client: httpx.Client) -> None:
    a = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    b = np.random.default_rng(4).standard_normal((4, 16)).astype(np.float32)
    body, headers = binary_request([("INPUT0", a, "FP32"), ("INPUT1", b, "FP32")],
                                   parameters={"binary_data_output": True})
    _, outputs = decode_response(client.post("/v2/models/add_sub/infer", content=body, headers=headers))
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


MODES = ["json", "binary-in", "binary-out-per-output", "binary-out-request", "binary-both"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_datatype_round_trip(client: httpx.Client, datatype: str, mode: str) -> None:
    """identity_<dtype>: what goes in comes out bit for bit, in every encoding."""
    x = _sample(datatype, (3, 7), seed=len(mode))
    binary_in = mode in ("binary-in", "binary-both")
    document: dict[str, Any] = {}
    if mode in ("binary-out-per-output", "binary-both"):
        document["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    elif mode == "binary-out-request":
        document["parameters"] = {"binary_data_output": True}
    if binary_in:
        body, headers = binary_request([("INPUT0", x, datatype)], **document)
        response = client.post(f"/v2/models/identity_{datatype.lower()}/infer", content=body, headers=headers)
    else:
        document["inputs"] = [json_input("INPUT0", x, datatype)]
        response = infer(client, f"identity_{datatype.lower()}", document)
    result, outputs = decode_response(response)
    [entry] = result["outputs"]
    assert entry["datatype"] == datatype and entry["shape"] == [3, 7]
    binary_out = mode.startswith("binary-out") or mode == "binary-both"
    assert ("binary_data_size" in entry.get("parameters", {})) is binary_out
    y = outputs["OUTPUT0"]
    if datatype == "BYTES":
        assert y.tolist() == x.tolist()
        if binary_out:  # each element length-prefixed, in order
            expected = _bytes_tensor(list(x.reshape(-1)))
            assert entry["parameters"]["binary_data_size"] == len(expected)
            assert response.content.endswith(expected)
    else:
        assert y.dtype == x.dtype
        assert y.tobytes() == x.tobytes()  # exact, -0.0 and extremes included


def test_bytes_that_are_not_utf8_are_refused_by_onnx_string_inputs(client: httpx.Client) -> None:
    # ONNX Runtime's string tensors hold UTF-8 text: refuse, never mangle.
    x = np.empty((1, 3), dtype=np.object_)
    x[0] = [b"ok", b"\x80", bytes(range(256))]
    body, headers = binary_request([("INPUT0", x, "BYTES")], parameters={"binary_data_output": True})
    response = client.post("/v2/models/identity_bytes/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert "INPUT0" in response.json()["error"] and "UTF-8" in response.json()["error"]


def test_infer_mlp_binary(client: httpx.Client) -> None:
    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    body, headers = binary_request([("INPUT0", x, "FP32")], parameters={"binary_data_output": True})
    _, outputs = decode_response(client.post("/v2/models/mlp/infer", content=body, headers=headers))
    assert outputs["OUTPUT0"].shape == (8, 10)
    np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(x), atol=1e-4)


def test_infer_non_batching_model(client: httpx.Client) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    document, outputs = decode_response(infer(client, "identity_nobatch", {"inputs": [json_input("INPUT0", x)]}))
    assert document["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_array_equal(outputs["OUTPUT0"], x)


def test_infer_reshaped_model(client: httpx.Client) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    document, outputs = decode_response(infer(client, "reshaped", {"inputs": [json_input("INPUT0", x)]}))
    assert document["outputs"][0]["shape"] == [3, 2, 2]
    np.testing.assert_array_equal(outputs["OUTPUT0"], x)


# -- versions -----------------------------------------------------------------------------------


def _versioned_body() -> dict[str, Any]:
    return {"inputs": [json_input("INPUT0", np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32))]}


def test_version_default_is_highest(client: httpx.Client) -> None:
    document, outputs = decode_response(infer(client, "versioned", _versioned_body()))
    assert document["model_version"] == "3"
    np.testing.assert_array_equal(outputs["OUTPUT0"], [[4.0, 5.0, 6.0, 7.0]])


@pytest.mark.parametrize("version", ["2", "3"])
def test_version_explicit(client: httpx.Client, version: str) -> None:
    document, outputs = decode_response(infer(client, "versioned", _versioned_body(), version=version))
    assert document["model_version"] == version
    np.testing.assert_array_equal(outputs["OUTPUT0"], np.array([[1.0, 2.0, 3.0, 4.0]]) + int(version))


@pytest.mark.parametrize(("version", "status"), [("1", 404), ("4", 404), ("abc", 400), ("-1", 400)])
def test_version_not_served(client: httpx.Client, version: str, status: int) -> None:
    response = infer(client, "versioned", _versioned_body(), version=version)
    assert response.status_code == status, response.text
    assert version in response.json()["error"]


# -- statistics -----------------------------------------------------------------------------------


def test_model_stats_count_requests(client: httpx.Client) -> None:
    before = stats(client, "mlp")
    assert before["name"] == "mlp" and before["version"] == "1"
    for rows in (1, 2, 3):  # one after the other: three executions, six samples
        x = np.ones((rows, 64), dtype=np.float32)
        decode_response(infer(client, "mlp", {"inputs": [json_input("INPUT0", x)]}))
    after = stats(client, "mlp")
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    success_before, success_after = before["inference_stats"]["success"], after["inference_stats"]["success"]
    assert success_after["count"] - success_before["count"] == 3
    assert success_after["ns"] > success_before["ns"]
    assert after["inference_stats"]["compute_infer"]["count"] - before["inference_stats"]["compute_infer"]["count"] == 3
    assert after["last_inference"] > 0
    batch_sizes = {entry["batch_size"] for entry in after["batch_stats"]}
    assert {1, 2, 3} <= batch_sizes

    # A failed request counts as a failure, not an inference.
    bad = infer(client, "mlp", {"inputs": [json_input("INPUT0", np.ones((1, 63), dtype=np.float32))]})
    assert bad.status_code == 400
    failed = stats(client, "mlp")
    assert failed["inference_stats"]["fail"]["count"] == after["inference_stats"]["fail"]["count"] + 1
    assert failed["inference_count"] == after["inference_count"]


def test_model_stats_for_a_version(client: httpx.Client) -> None:
    response = client.get("/v2/models/versioned/versions/2/stats")
    assert response.status_code == 200
    assert [(s["name"], s["version"]) for s in response.json()["model_stats"]] == [("versioned", "2")]
    all_versions = client.get("/v2/models/versioned/stats").json()["model_stats"]
    assert sorted(s["version"] for s in all_versions) == ["2", "3"]


def test_all_model_stats(client: httpx.Client) -> None:
    response = client.get("/v2/models/stats")
    assert response.status_code == 200
    listed = {(s["name"], s["version"]) for s in response.json()["model_stats"]}
    expected = {(f"identity_{d.lower()}", "1") for d in ALL_DATATYPES} | {
        ("mlp", "1"), ("add_sub", "1"), ("identity_nobatch", "1"), ("reshaped", "1"), ("slow", "1"),
        ("slow_small_queue", "1"), ("slow_timeout", "1"), ("versioned", "2"), ("versioned", "3"),
    }
    assert expected <= listed
    # Loaded versions only: nothing that failed to load, not versioned/1 (outside the policy).
    assert not {name for name, _ in listed} & {"broken_model", "broken_syntax", "wrong_config"}
    assert ("versioned", "1") not in listed


# -- repository index ------------------------------------------------------------------------------


def test_repository_index(client: httpx.Client) -> None:
    response = client.post("/v2/repository/index")
    assert response.status_code == 200
    rows = response.json()
    by_key = {(row["name"], row.get("version")): row for row in rows}
    assert by_key[("mlp", "1")]["state"] == "READY"
    assert by_key[("versioned", "2")]["state"] == "READY"
    assert by_key[("versioned", "3")]["state"] == "READY"
    assert ("versioned", "1") not in by_key

    syntax = by_key[("broken_syntax", None)]
    assert syntax["state"] == "UNAVAILABLE"
    assert "config.pbtxt" in syntax["reason"] and "Expected" in syntax["reason"]
    model = by_key[("broken_model", "1")]
    assert model["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in model["reason"]
    wrong = by_key[("wrong_config", "1")]
    assert wrong["state"] == "UNAVAILABLE" and "TYPE_INT32" in wrong["reason"]
    names = {row["name"] for row in rows}
    assert {f"identity_{d.lower()}" for d in ALL_DATATYPES} <= names


def test_repository_index_ready_only(client: httpx.Client) -> None:
    response = client.post("/v2/repository/index", json={"ready": True})
    assert response.status_code == 200
    rows = response.json()
    assert rows and all(row["state"] == "READY" for row in rows)
    names = {row["name"] for row in rows}
    assert {"mlp", "versioned", "add_sub"} <= names
    assert not names & {"broken_syntax", "broken_model", "wrong_config"}
    everything = client.post("/v2/repository/index", json={"ready": False}).json()
    assert len(everything) > len(rows)


# -- metrics -----------------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (labels matched as given)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in /metrics")


def test_metrics(client: httpx.Client, server: ServerProcess) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    decode_response(infer(client, "mlp", {"inputs": [json_input("INPUT0", x)]}))
    entry = stats(client, "mlp")
    response = httpx.get(server.metrics_url, timeout=TIMEOUT)
    assert response.status_code == 200
    text = response.text
    mlp = {"model": "mlp", "version": "1"}
    assert _metric(text, "inferstack_request_success_total", **mlp) == entry["inference_stats"]["success"]["count"]
    assert _metric(text, "inferstack_inference_count_total", **mlp) == entry["inference_count"]
    assert _metric(text, "inferstack_execution_count_total", **mlp) == entry["execution_count"]
    count = _metric(text, "inferstack_request_duration_seconds_count", **mlp)
    assert count >= entry["inference_stats"]["success"]["count"] >= 1
    assert _metric(text, "inferstack_request_duration_seconds_bucket", le="+Inf", **mlp) == count
    assert _metric(text, "inferstack_queue_duration_seconds_count", **mlp) >= 1
    assert _metric(text, "inferstack_compute_duration_seconds_count", **mlp) >= 1
    assert _metric(text, "inferstack_batch_size_bucket", le="+Inf", **mlp) == entry["execution_count"]
    assert _metric(text, "inferstack_pending_requests", **mlp) == 0
    assert _metric(text, "inferstack_model_ready", model="versioned", version="2") == 1
    assert _metric(text, "process_resident_memory_bytes") > 0
    # A version that failed to load is reported not ready, and has no request series.
    assert _metric(text, "inferstack_model_ready", model="broken_model", version="1") == 0
    assert 'inferstack_request_success_total{model="broken_model"' not in text
    # Every failure reason has a series from the start.
    assert _metric(text, "inferstack_request_failure_total", reason="timeout", **mlp) >= 0
    # Requests that never reach a model are counted by the HTTP layer.
    assert client.post("/v2/models/no_such_model/infer", content=b"{}").status_code == 404
    after = httpx.get(server.metrics_url, timeout=TIMEOUT).text
    assert _metric(after, "inferstack_http_responses_total", endpoint="infer", code="404") >= 1
    assert _metric(after, "inferstack_http_responses_total", endpoint="infer", code="200") >= 1


def _wait_idle(server: ServerProcess, model: str) -> None:
    """Until nothing is queued or executing for ``model`` (by the metrics)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        text = httpx.get(server.metrics_url, timeout=TIMEOUT).text
        if _metric(text, "inferstack_inflight_requests", model=model, version="1") == 0:
            return
        assert time.monotonic() < deadline, f"requests for {model} still in flight after {TIMEOUT}s"
        time.sleep(0.1)


# -- concurrency ---------------------------------------------------------------------------------------


async def _warm(client: httpx.AsyncClient, connections: int) -> None:
    """Open ``connections`` keep-alive connections so a burst is sent at once."""
    await asyncio.gather(*(client.get("/v2/health/live") for _ in range(connections)))


def _async_client(server: ServerProcess, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url,
        timeout=TIMEOUT,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def test_concurrent_requests_get_their_own_answers(server: ServerProcess) -> None:
    """Hundreds of concurrent mlp requests, batched together by the server, each
    answered with the output of its own input (no mixing up of batch rows)."""
    rng = np.random.default_rng(7)
    total = 320
    rows = [1 if i % 2 else int(rng.integers(2, 5)) for i in range(total)]
    inputs = [(rng.standard_normal((n, 64)) + i / 100).astype(np.float32) for i, n in enumerate(rows)]

    async def main() -> list[tuple[int, httpx.Response]]:
        limit = asyncio.Semaphore(64)
        async with _async_client(server, 64) as client:
            await _warm(client, 64)

            async def one(i: int) -> tuple[int, httpx.Response]:
                async with limit:
                    if i % 3 == 0:
                        body, headers = binary_request([("INPUT0", inputs[i], "FP32")],
                                                       id=str(i), parameters={"binary_data_output": True})
                        return i, await client.post("/v2/models/mlp/infer", content=body, headers=headers)
                    return i, await client.post("/v2/models/mlp/infer",
                                                json={"id": str(i), "inputs": [json_input("INPUT0", inputs[i])]})

            return await asyncio.gather(*(one(i) for i in range(total)))

    for i, response in asyncio.run(main()):
        document, outputs = decode_response(response)
        assert document["id"] == str(i)
        assert outputs["OUTPUT0"].shape == (rows[i], 10)
        np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(inputs[i]), atol=1e-4, rtol=1e-5)


def test_concurrent_mixed_shapes_and_outputs(server: ServerProcess) -> None:
    """Concurrent requests that must not be batched together (different non-batch
    shapes) or that ask for different outputs: each gets exactly its own answer."""
    rng = np.random.default_rng(11)
    cases: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]] = []
    for i in range(160):
        kind = i % 4
        if kind == 0:  # identity_fp32 has dims [-1]: widths differ from request to request
            x = rng.standard_normal((int(rng.integers(1, 5)), int(rng.integers(1, 6)))).astype(np.float32)
            cases.append(("identity_fp32", {"inputs": [json_input("INPUT0", x)]}, {"OUTPUT0": x}))
        elif kind == 1:  # add_sub: one output, the other, or both
            a = rng.standard_normal((int(rng.integers(1, 4)), 16)).astype(np.float32)
            b = rng.standard_normal(a.shape).astype(np.float32)
            expected = {"OUTPUT0": a + b, "OUTPUT1": a - b}
            wanted = [["OUTPUT0"], ["OUTPUT1"], ["OUTPUT0", "OUTPUT1"]][i % 3]
            body = {"inputs": [json_input("INPUT0", a), json_input("INPUT1", b)],
                    "outputs": [{"name": name} for name in wanted]}
            cases.append(("add_sub", body, {name: expected[name] for name in wanted}))
        elif kind == 2:
            x = rng.standard_normal((int(rng.integers(1, 4)), 2, 2)).astype(np.float32)
            cases.append(("reshaped", {"inputs": [json_input("INPUT0", x)]}, {"OUTPUT0": x}))
        else:
            x = rng.standard_normal((2, 3)).astype(np.float32)
            cases.append(("identity_nobatch", {"inputs": [json_input("INPUT0", x)]}, {"OUTPUT0": x}))

    async def main() -> list[httpx.Response]:
        limit = asyncio.Semaphore(48)
        async with _async_client(server, 48) as client:
            await _warm(client, 48)

            async def one(model: str, body: dict[str, Any]) -> httpx.Response:
                async with limit:
                    return await client.post(f"/v2/models/{model}/infer", json=body)

            return await asyncio.gather(*(one(model, body) for model, body, _ in cases))

    for (model, _, expected), response in zip(cases, asyncio.run(main())):
        document, outputs = decode_response(response)
        assert document["model_name"] == model
        assert sorted(outputs) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(outputs[name], array)


def _slow_input(i: int) -> np.ndarray:
    return np.array([[i, -i, i / 7, 1000 + i]], dtype=np.float32)


async def _burst(server: ServerProcess, model: str, count: int,
                 parameters: dict[str, Any] | None = None) -> list[tuple[int, httpx.Response]]:
    """``count`` requests to a slow identity model at once, over warm connections."""
    async with _async_client(server, count) as client:
        await _warm(client, count)

        async def one(i: int) -> tuple[int, httpx.Response]:
            body: dict[str, Any] = {"inputs": [json_input("INPUT0", _slow_input(i))]}
            if parameters:
                body["parameters"] = parameters
            return i, await client.post(f"/v2/models/{model}/infer", json=body)

        return await asyncio.gather(*(one(i) for i in range(count)))


def _assert_identity(i: int, response: httpx.Response) -> None:
    _, outputs = decode_response(response)
    np.testing.assert_array_equal(outputs["OUTPUT0"], _slow_input(i))


def test_dynamic_batches_form(client: httpx.Client, server: ServerProcess) -> None:
    for _attempt in range(3):  # a very busy machine might send a burst slowly; try again
        before = stats(client, "slow")
        results = asyncio.run(_burst(server, "slow", 64))
        for i, response in results:
            _assert_identity(i, response)
        after = stats(client, "slow")
        inferences = after["inference_count"] - before["inference_count"]
        executions = after["execution_count"] - before["execution_count"]
        assert inferences == 64
        assert 1 <= executions <= inferences
        if executions < inferences:
            break
    assert executions < inferences, "no two requests were ever batched together"
    assert max(entry["batch_size"] for entry in after["batch_stats"]) > 1


def test_overload_answers_503_with_retry_after(client: httpx.Client, server: ServerProcess) -> None:
    """slow_small_queue holds at most 2 waiting requests: a burst overflows it.
    The overflow is refused at once with 503 + Retry-After; the rest are answered correctly."""
    rejected: list[httpx.Response] = []
    for _attempt in range(3):  # a very busy machine might send a burst slowly; try again
        results = asyncio.run(_burst(server, "slow_small_queue", 48))
        for i, response in results:
            if response.status_code == 503:
                rejected.append(response)
                assert int(response.headers["Retry-After"]) >= 1
                message = response.json()["error"]
                assert "slow_small_queue" in message and "queue" in message, message
            else:
                _assert_identity(i, response)
        assert any(r.status_code == 200 for _, r in results)
        if rejected:
            break
    assert rejected, "a burst of 48 requests never overflowed a queue of 2"

    # Afterwards the model serves normally.
    response = infer(client, "slow_small_queue", {"inputs": [json_input("INPUT0", _slow_input(5))]})
    _assert_identity(5, response)


def test_queue_timeout_answers_503(client: httpx.Client, server: ServerProcess) -> None:
    """With the request parameter ``timeout`` of 1 µs, requests that have to wait
    behind a busy model time out in the queue with 503."""
    timed_out: list[httpx.Response] = []
    for _attempt in range(3):
        results = asyncio.run(_burst(server, "slow_timeout", 32, {"timeout": 1}))
        for i, response in results:
            if response.status_code == 503:
                timed_out.append(response)
                message = response.json()["error"]
                assert "slow_timeout" in message and "timed out" in message, message
            else:
                _assert_identity(i, response)
        if timed_out:
            break
    assert timed_out, "no request timed out"
    # Afterwards it serves again. Its own queue timeout is 1 ms, which a request
    # to the idle model may still miss on a very busy machine: allow retries.
    _wait_idle(server, "slow_timeout")
    for _attempt in range(20):
        response = infer(client, "slow_timeout", {"inputs": [json_input("INPUT0", _slow_input(3))]})
        if response.status_code != 503:
            break
        assert "timed out" in response.json()["error"]
    _assert_identity(3, response)


def test_timed_out_requests_are_not_executed(client: httpx.Client, server: ServerProcess) -> None:
    """A request answered 503 (timed out in the queue) must not cost an execution:
    with batch-1 requests, samples inferred == requests that succeeded."""
    _wait_idle(server, "slow_timeout")
    before = stats(client, "slow_timeout")
    succeeded = 0
    for _attempt in range(3):
        results = asyncio.run(_burst(server, "slow_timeout", 32, {"timeout": 1}))
        succeeded += sum(response.status_code == 200 for _, response in results)
    _wait_idle(server, "slow_timeout")
    after = stats(client, "slow_timeout")
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == succeeded
    assert after["inference_count"] - before["inference_count"] == succeeded


def _raw_request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("model", ["slow", "slow_small_queue"])
def test_client_disconnects(client: httpx.Client, server: ServerProcess, model: str) -> None:
    """Clients that go away before their answers come back (queued, running, or
    halfway through sending the body) leave the server healthy, the queue empty
    and nothing in the log but an info line."""
    log_offset = len(server.log())
    port = server.http_port
    sockets = []
    for i in range(24):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        body = orjson.dumps({"inputs": [json_input("INPUT0", _slow_input(i))]})
        if i % 4 == 3:  # only part of the body, then gone
            sock.sendall(_raw_request(f"/v2/models/{model}/infer", body)[:-10])
        else:
            sock.sendall(_raw_request(f"/v2/models/{model}/infer", body))
        sockets.append(sock)
    for sock in sockets:
        sock.close()

    assert client.get("/v2/health/live").status_code == 200
    _wait_idle(server, model)  # nothing stays queued or executing for clients that are gone
    for i in range(3):
        response = infer(client, model, {"inputs": [json_input("INPUT0", _slow_input(100 + i))]})
        _assert_identity(100 + i, response)
    log = server.log()[log_offset:]
    assert "Traceback" not in log, log
