"""Bad requests over HTTP: every client mistake gets its exact status and a message
naming the offending field, input, model or value — never a 500 — and the server
keeps serving afterwards.

Each case is a raw body (JSON, or JSON + binary tensor data) posted to a real
server subprocess (the session ``server`` fixture on the shared test repository).
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferstack.testing import onnx_models
from tests.support import ServerProcess

TIMEOUT = 60.0

FP32_64 = [0.5] * 64  # one row of the mlp's INPUT0


def _input(name: str = "INPUT0", datatype: str = "FP32", shape: object = (1, 64),
           data: object = FP32_64, **extra: object) -> dict:
    item: dict = {"name": name, "datatype": datatype,
                  "shape": list(shape) if isinstance(shape, tuple) else shape}
    if data is not None:
        item["data"] = data
    item.update(extra)
    return item


def _json(document: object) -> bytes:
    # The standard library, not orjson: it writes integers beyond 64 bits as they are.
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass
class Case:
    """One bad request and what the server must answer."""

    model: str
    body: bytes
    status: int
    #: Substrings the ``error`` message must contain (all of them).
    mentions: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""  # overrides /v2/models/{model}/infer


def _binary(document: dict, payload: bytes, header_length: object = None) -> tuple[bytes, dict[str, str]]:
    header = _json(document)
    length = len(header) if header_length is None else header_length
    return header + payload, {
        "Inference-Header-Content-Length": str(length),
        "Content-Type": "application/octet-stream",
    }


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _binary_case(model: str, inputs: list[dict], payload: bytes, status: int, mentions: tuple[str, ...],
                 header_length: object = None, **document: object) -> Case:
    body, headers = _binary({"inputs": inputs, **document}, payload, header_length)
    return Case(model, body, status, mentions, headers)


def _bin_input(name: str = "INPUT0", datatype: str = "FP32", shape: tuple = (1, 64), size: object = 256) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "parameters": {"binary_data_size": size}}


_ROW = np.full(64, 0.5, dtype=np.float32).tobytes()  # 256 bytes: one mlp row in binary
_NESTED_DEEP = b'{"inputs":' + b"[" * 100_000
_data_deep: object = 1.0
for _ in range(100):  # nested within orjson's depth limit, beyond numpy's 64 dimensions
    _data_deep = [_data_deep]


def _cases() -> Iterator[object]:
    def case(case_id: str, *args: object, **kwargs: object) -> object:
        return pytest.param(Case(*args, **kwargs), id=case_id)  # type: ignore[arg-type]

    def body(case_id: str, model: str, document: object, status: int, *mentions: str) -> object:
        return case(case_id, model, _json(document), status, tuple(mentions))

    add_sub_inputs = [
        _input("INPUT0", shape=(1, 16), data=[1.0] * 16),
        _input("INPUT1", shape=(1, 16), data=[2.0] * 16),
    ]

    # -- the body as a whole -----------------------------------------------------------
    yield case("malformed-json", "mlp", b'{"inputs": [', 400, ("malformed JSON",))
    yield case("empty-body", "mlp", b"", 400, ("malformed JSON",))
    yield case("not-utf8", "mlp", b'{"inputs": "\xff\xfe"}', 400, ("malformed JSON",))
    yield case("nan-literal", "mlp", b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", '
               b'"shape": [1, 1], "data": [NaN]}]}', 400, ("malformed JSON",))
    yield body("body-is-a-list", "mlp", [{"inputs": []}], 400, "JSON object")
    yield body("body-is-a-string", "mlp", "inputs", 400, "JSON object")
    yield case("deeply-nested-json", "mlp", _NESTED_DEEP, 400, ("malformed JSON", "depth"))
    yield body("data-over-64-dims", "identity_fp32", {"inputs": [_input(shape=(1, 1), data=_data_deep)]},
               400, "'INPUT0'", "not a regular array")
    yield body("id-not-a-string", "mlp", {"id": 7, "inputs": [_input()]}, 400, "'id'")
    yield body("parameters-not-an-object", "mlp", {"parameters": [1], "inputs": [_input()]}, 400, "'parameters'")

    # -- inputs --------------------------------------------------------------------------
    yield body("inputs-missing", "mlp", {"outputs": []}, 400, "'inputs'")
    yield body("inputs-empty", "mlp", {"inputs": []}, 400, "'inputs'")
    yield body("inputs-not-a-list", "mlp", {"inputs": {"name": "INPUT0"}}, 400, "'inputs'")
    yield body("input-not-an-object", "mlp", {"inputs": [[1, 2]]}, 400, "inputs[0]", "object")
    yield body("input-name-missing", "mlp", {"inputs": [{"datatype": "FP32", "shape": [1, 64], "data": FP32_64}]},
               400, "inputs[0]", "'name'")
    yield body("input-name-empty", "mlp", {"inputs": [_input(name="")]}, 400, "inputs[0]", "'name'")
    yield body("input-name-not-a-string", "mlp", {"inputs": [_input(name=5)]}, 400, "inputs[0]", "'name'")
    yield body("input-duplicate", "mlp", {"inputs": [_input(), _input()]}, 400, "'INPUT0'", "more than once")
    yield body("input-unknown", "add_sub", {"inputs": [*add_sub_inputs, _input("INPUT9", shape=(1, 16),
               data=[0.0] * 16)]}, 400, "'INPUT9'", "add_sub")
    yield body("input-required-missing", "add_sub", {"inputs": add_sub_inputs[:1]}, 400, "missing input 'INPUT1'")
    yield body("input-parameters-not-an-object", "mlp", {"inputs": [_input(parameters="binary")]},
               400, "'INPUT0'", "'parameters'")
    yield body("input-shared-memory", "mlp",
               {"inputs": [_input(data=None, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 256})]},
               400, "'INPUT0'", "shared memory")
    yield body("input-neither-data-nor-binary", "mlp", {"inputs": [_input(data=None)]}, 400, "'INPUT0'", "'data'")

    # -- datatypes -----------------------------------------------------------------------
    yield body("datatype-unknown", "mlp", {"inputs": [_input(datatype="FP128")]}, 400, "'FP128'", "'INPUT0'")
    yield body("datatype-missing", "mlp", {"inputs": [{"name": "INPUT0", "shape": [1, 64], "data": FP32_64}]},
               400, "'INPUT0'", "datatype")
    yield body("datatype-lowercase", "mlp", {"inputs": [_input(datatype="fp32")]}, 400, "'fp32'")
    yield body("datatype-mismatch-fp64-for-fp32", "mlp", {"inputs": [_input(datatype="FP64")]},
               400, "'INPUT0'", "FP64", "FP32")
    yield body("datatype-mismatch-int32-for-fp32", "mlp", {"inputs": [_input(datatype="INT32", data=[1] * 64)]},
               400, "'INPUT0'", "INT32", "FP32")

    # -- shapes --------------------------------------------------------------------------
    yield body("shape-missing", "mlp", {"inputs": [_input(shape=None)]}, 400, "'INPUT0'", "'shape'")
    yield body("shape-not-a-list", "mlp", {"inputs": [_input(shape=64)]}, 400, "'INPUT0'", "'shape'")
    yield body("shape-wrong-rank", "mlp", {"inputs": [_input(shape=(64,))]}, 400, "'INPUT0'", "[64]", "[-1, 64]")
    yield body("shape-wrong-rank-3d", "mlp", {"inputs": [_input(shape=(1, 1, 64))]}, 400, "'INPUT0'", "[1, 1, 64]")
    yield body("shape-wrong-dim", "mlp", {"inputs": [_input(shape=(1, 63), data=[0.5] * 63)]},
               400, "'INPUT0'", "[1, 63]", "[-1, 64]")
    yield body("shape-nobatch-given-batch", "identity_nobatch",
               {"inputs": [_input(shape=(1, 2, 3), data=[1.0] * 6)]}, 400, "'INPUT0'", "[1, 2, 3]", "[2, 3]")
    yield body("batch-over-max-batch-size", "identity_fp32", {"inputs": [_input(shape=(5, 1), data=[1.0] * 5)]},
               400, "'INPUT0'", "batch size 5", "max_batch_size 4")
    yield body("batch-zero", "mlp", {"inputs": [_input(shape=(0, 64), data=[])]}, 400, "'INPUT0'", "batch size 0")
    yield body("batch-sizes-disagree", "add_sub", {"inputs": [
        _input("INPUT0", shape=(1, 16), data=[1.0] * 16), _input("INPUT1", shape=(2, 16), data=[1.0] * 32)]},
        400, "'INPUT1'", "batch size 2")
    for id_, shape in (
        ("negative", [-1, 64]),
        ("float", [1.0, 64]),
        ("string", ["1", 64]),
        ("bool", [True, 64]),
        ("null", [None, 64]),
        ("nested-list", [[1], 64]),
        ("overflowing-u64", [2**64, 1]),  # beyond 64 bits: orjson gives a float
        ("huge-int64", [2**63 - 1, 1]),
        ("huge-product", [2**62, 2**62]),
        ("product-overflows-int64", [2**32, 2**32, 2**32]),
    ):
        yield body(f"shape-{id_}", "mlp", {"inputs": [_input(shape=shape)]}, 400, "'INPUT0'", "shape")
    yield body("shape-over-32-dims", "identity_fp32", {"inputs": [_input(shape=[1] * 33, data=[1.0])]},
               400, "'INPUT0'", "32 dimensions")

    # -- JSON data -----------------------------------------------------------------------
    yield body("data-too-few-elements", "mlp", {"inputs": [_input(data=[0.5] * 63)]},
               400, "'INPUT0'", "64 elements", "63")
    yield body("data-too-many-elements", "mlp", {"inputs": [_input(data=[0.5] * 65)]},
               400, "'INPUT0'", "64 elements", "65")
    yield body("data-ragged", "identity_fp32", {"inputs": [_input(shape=(2, 2), data=[[1.0, 2.0], [3.0]])]},
               400, "'INPUT0'", "not a regular array")
    yield body("data-strings-for-fp32", "identity_fp32", {"inputs": [_input(shape=(1, 2), data=["a", "b"])]},
               400, "'INPUT0'", "FP32", "strings")
    yield body("data-mixed-strings-and-numbers", "identity_fp32",
               {"inputs": [_input(shape=(1, 2), data=[1.0, "2"])]}, 400, "'INPUT0'", "strings")
    yield body("data-null-for-fp32", "identity_fp32", {"inputs": [_input(shape=(1, 2), data=[1.0, None])]},
               400, "'INPUT0'", "FP32", "numbers")
    yield body("data-object-for-fp32", "identity_fp32", {"inputs": [_input(shape=(1, 1), data=[{"x": 1}])]},
               400, "'INPUT0'", "FP32")
    yield body("data-floats-for-int32", "identity_int32",
               {"inputs": [_input(datatype="INT32", shape=(1, 2), data=[1, 1.5])]},
               400, "'INPUT0'", "INT32", "floats")
    yield body("data-bools-for-int32", "identity_int32",
               {"inputs": [_input(datatype="INT32", shape=(1, 2), data=[True, False])]},
               400, "'INPUT0'", "INT32", "booleans")
    yield body("data-300-for-uint8", "identity_uint8",
               {"inputs": [_input(datatype="UINT8", shape=(1, 2), data=[1, 300])]}, 400, "'INPUT0'", "UINT8")
    yield body("data-128-for-int8", "identity_int8",
               {"inputs": [_input(datatype="INT8", shape=(1, 1), data=[128])]}, 400, "'INPUT0'", "INT8")
    yield body("data-negative-for-uint32", "identity_uint32",
               {"inputs": [_input(datatype="UINT32", shape=(1, 2), data=[5, -1])]}, 400, "'INPUT0'", "UINT32")
    yield body("data-2**63-for-int64", "identity_int64",
               {"inputs": [_input(datatype="INT64", shape=(1, 1), data=[2**63])]}, 400, "'INPUT0'", "range", "INT64")
    yield body("data-1-and-2**63-for-int64", "identity_int64",
               {"inputs": [_input(datatype="INT64", shape=(1, 2), data=[1, 2**63])]}, 400, "'INPUT0'", "range", "INT64")
    yield body("data-negative-and-2**63-for-uint64", "identity_uint64",
               {"inputs": [_input(datatype="UINT64", shape=(1, 2), data=[-1, 2**63])]},
               400, "'INPUT0'", "range", "UINT64")
    yield body("data-float-and-2**63-for-uint64", "identity_uint64",
               {"inputs": [_input(datatype="UINT64", shape=(1, 2), data=[0.5, 2**63])]},
               400, "'INPUT0'", "UINT64", "floats")
    yield body("data-2**64-for-uint64", "identity_uint64",
               {"inputs": [_input(datatype="UINT64", shape=(1, 1), data=[2**64])]}, 400, "'INPUT0'", "UINT64")
    yield body("data-2**70-for-int64", "identity_int64",
               {"inputs": [_input(datatype="INT64", shape=(1, 1), data=[2**70])]}, 400, "'INPUT0'", "INT64")
    yield body("data-ints-for-bool", "identity_bool",
               {"inputs": [_input(datatype="BOOL", shape=(1, 2), data=[1, 0])]}, 400, "'INPUT0'", "BOOL")
    yield body("data-strings-for-bool", "identity_bool",
               {"inputs": [_input(datatype="BOOL", shape=(1, 1), data=["true"])]}, 400, "'INPUT0'", "BOOL")
    yield body("data-numbers-for-bytes", "identity_bytes",
               {"inputs": [_input(datatype="BYTES", shape=(1, 2), data=[1, 2])]}, 400, "'INPUT0'", "BYTES", "strings")
    yield body("data-and-binary-both", "mlp",
               {"inputs": [_input(parameters={"binary_data_size": 256})]}, 400, "'INPUT0'", "binary_data_size")

    # -- binary tensor data ---------------------------------------------------------------
    yield _case_param("header-length-beyond-body", _binary_case(
        "mlp", [_bin_input()], _ROW, 400, ("Inference-Header-Content-Length",), header_length=10**6))
    yield _case_param("header-length-negative", _binary_case(
        "mlp", [_bin_input()], _ROW, 400, ("Inference-Header-Content-Length", "-5"), header_length=-5))
    yield _case_param("header-length-not-a-number", _binary_case(
        "mlp", [_bin_input()], _ROW, 400, ("Inference-Header-Content-Length", "'abc'"), header_length="abc"))
    yield _case_param("header-length-cuts-the-json", _binary_case(
        "mlp", [_bin_input()], _ROW, 400, ("malformed JSON",), header_length=10))
    yield _case_param("binary-size-beyond-body", _binary_case(
        "mlp", [_bin_input(size=512)], _ROW, 400, ("'INPUT0'", "binary_data_size 512", "256")))
    yield _case_param("binary-size-negative", _binary_case(
        "mlp", [_bin_input(size=-256)], _ROW, 400, ("'INPUT0'", "'binary_data_size'")))
    yield _case_param("binary-size-not-an-integer", _binary_case(
        "mlp", [_bin_input(size="256")], _ROW, 400, ("'INPUT0'", "'binary_data_size'")))
    yield _case_param("binary-leftover-bytes", _binary_case(
        "mlp", [_bin_input()], _ROW + b"\0" * 8, 400, ("8 bytes", "no input")))
    yield _case_param("binary-data-without-binary-input", _binary_case(
        "mlp", [_input()], b"\0" * 4, 400, ("4 bytes", "no input")))
    yield _case_param("binary-size-not-shape-times-itemsize", _binary_case(
        "mlp", [_bin_input(size=252)], _ROW[:252], 400, ("'INPUT0'", "256", "252")))
    yield _case_param("binary-second-input-short", _binary_case(
        "add_sub", [_bin_input("INPUT0", shape=(1, 16), size=64), _bin_input("INPUT1", shape=(1, 16), size=64)],
        b"\0" * 100, 400, ("'INPUT1'", "binary_data_size 64", "36")))
    yield _case_param("bytes-element-truncated", _binary_case(
        "identity_bytes", [_bin_input(datatype="BYTES", shape=(1, 2), size=14)],
        _bytes_tensor([b"abc"]) + struct.pack("<I", 10) + b"xyz", 400, ("'INPUT0'", "element 1", "10 bytes")))
    yield _case_param("bytes-length-prefix-truncated", _binary_case(
        "identity_bytes", [_bin_input(datatype="BYTES", shape=(1, 2), size=9)],
        _bytes_tensor([b"abc"]) + b"\x01\x00", 400, ("'INPUT0'",)))
    yield _case_param("bytes-trailing-bytes", _binary_case(
        "identity_bytes", [_bin_input(datatype="BYTES", shape=(1, 1), size=9)],
        _bytes_tensor([b"abc"]) + b"zz", 400, ("'INPUT0'", "trailing")))
    yield _case_param("bytes-huge-count", _binary_case(
        "identity_bytes", [_bin_input(datatype="BYTES", shape=(4, 2**38), size=8)],
        _bytes_tensor([b"abcd"]), 400, ("'INPUT0'", "BYTES", "8")))

    # -- outputs and parameters -----------------------------------------------------------
    yield body("output-unknown", "add_sub", {"inputs": add_sub_inputs, "outputs": [{"name": "OUTPUT7"}]},
               400, "'OUTPUT7'", "unknown output")
    yield body("output-parameters-not-an-object", "mlp",
               {"inputs": [_input()], "outputs": [{"name": "OUTPUT0", "parameters": [True]}]},
               400, "'OUTPUT0'", "'parameters'")
    yield body("output-shared-memory", "mlp",
               {"inputs": [_input()], "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "r"}}]},
               400, "'OUTPUT0'", "shared memory")
    yield body("output-classification", "mlp",
               {"inputs": [_input()], "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 3}}]},
               400, "'OUTPUT0'", "classification")
    yield body("outputs-not-a-list", "mlp", {"inputs": [_input()], "outputs": {"name": "OUTPUT0"}}, 400, "'outputs'")
    yield body("output-without-name", "mlp", {"inputs": [_input()], "outputs": [{"parameters": {}}]},
               400, "outputs[0]", "'name'")
    yield body("output-binary-data-not-a-bool", "mlp",
               {"inputs": [_input()], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]},
               400, "'OUTPUT0'", "'binary_data'", "boolean")
    yield body("output-binary-data-is-an-int", "mlp",
               {"inputs": [_input()], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": 1}}]},
               400, "'OUTPUT0'", "'binary_data'")
    yield body("binary-data-output-not-a-bool", "mlp",
               {"inputs": [_input()], "parameters": {"binary_data_output": "true"}}, 400, "'binary_data_output'")
    for key in ("priority", "timeout"):
        for id_, value in (("negative", -1), ("float", 1.5), ("string", "10"), ("bool", True), ("null", None)):
            yield body(f"{key}-{id_}", "mlp", {"inputs": [_input()], "parameters": {key: value}},
                       400, f"'{key}'", "non-negative integer")

    # -- models and versions --------------------------------------------------------------
    ok = {"inputs": [_input()]}
    yield body("model-unknown", "no_such_model", ok, 404, "'no_such_model'")
    yield case("version-unknown", "versioned", _json({"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]}),
               404, ("'versioned'", "version 7"), path="/v2/models/versioned/versions/7/infer")
    yield case("version-not-loaded", "versioned", _json({"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]}),
               404, ("'versioned'", "version 1"), path="/v2/models/versioned/versions/1/infer")
    yield case("version-not-a-number", "versioned", _json({"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]}),
               400, ("'versioned'", "'abc'"), path="/v2/models/versioned/versions/abc/infer")
    yield body("model-broken-onnx", "broken_model", {"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]},
               503, "'broken_model'", "not ready")
    yield body("model-broken-config", "broken_syntax", {"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]},
               503, "'broken_syntax'", "config.pbtxt")
    yield body("model-config-mismatch", "wrong_config", {"inputs": [_input(shape=(1, 4), data=[1.0] * 4)]},
               503, "'wrong_config'", "TYPE_INT32")

    # -- encodings ------------------------------------------------------------------------
    yield case("gzip-invalid", "mlp", b"definitely not gzip", 400, ("gzip",),
               headers={"Content-Encoding": "gzip"})
    yield case("gzip-truncated", "mlp", gzip.compress(_json(ok))[:20], 400, ("gzip", "truncated"),
               headers={"Content-Encoding": "gzip"})
    yield case("gzip-without-trailer", "mlp", gzip.compress(_json(ok))[:-8], 400, ("gzip", "truncated"),
               headers={"Content-Encoding": "gzip"})
    yield case("deflate-invalid", "mlp", b"not deflate", 400, ("deflate",), headers={"Content-Encoding": "deflate"})
    yield case("encoding-unsupported", "mlp", _json(ok), 400, ("Content-Encoding", "'br'"),
               headers={"Content-Encoding": "br"})


def _case_param(case_id: str, case: Case) -> object:
    return pytest.param(case, id=case_id)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def log_offset(server: ServerProcess) -> Iterator[int]:
    """Where the server log stood before this module's requests (to look for tracebacks after)."""
    yield len(server.log())


def _error(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    document = response.json()
    assert set(document) == {"error"}, document
    assert isinstance(document["error"], str) and document["error"]
    return document["error"]


@pytest.mark.parametrize("case", list(_cases()))
def test_bad_infer_request(client: httpx.Client, case: Case) -> None:
    path = case.path or f"/v2/models/{case.model}/infer"
    headers = {"Content-Type": "application/json", **case.headers}
    response = client.post(path, content=case.body, headers=headers)
    assert response.status_code == case.status, response.text
    message = _error(response)
    for mention in case.mentions:
        assert mention in message, f"{mention!r} not in {message!r}"


def test_bytes_count_is_checked_before_allocation(client: httpx.Client) -> None:
    """A BYTES shape claiming 2**40 elements with 8 bytes of data must be refused
    from the shape, not by trying to allocate an array of 2**40 objects."""
    body, headers = _binary({"inputs": [_bin_input(datatype="BYTES", shape=(1, 2**40), size=8)]},
                            _bytes_tensor([b"abcd"]))
    response = client.post("/v2/models/identity_bytes/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    message = _error(response)
    assert "'INPUT0'" in message and str(4 * 2**40) in message


def test_json_data_is_checked_before_allocation(client: httpx.Client) -> None:
    response = client.post("/v2/models/identity_fp32/infer",
                           json={"inputs": [_input(shape=[1, 2**40], data=[1.0])]})
    assert response.status_code == 400, response.text
    assert "needs 1099511627776 elements" in _error(response)


@pytest.mark.parametrize(
    ("method", "path", "status", "mention"),
    [
        ("GET", "/v2/no/such/endpoint", 404, "/v2/no/such/endpoint"),
        ("GET", "/", 404, "GET /"),
        ("POST", "/v2/models/mlp/infer/extra", 404, "/v2/models/mlp/infer/extra"),
        ("GET", "/v2/models/mlp/infer", 405, "GET"),
        ("PUT", "/v2/models/mlp/infer", 405, "PUT"),
        ("POST", "/v2/health/live", 405, "/v2/health/live"),
        ("DELETE", "/v2/models/mlp", 405, "DELETE"),
        ("GET", "/v2/repository/index", 405, "/v2/repository/index"),
        ("GET", "/v2/models/no_such_model", 404, "'no_such_model'"),
        ("GET", "/v2/models/no_such_model/config", 404, "'no_such_model'"),
        ("GET", "/v2/models/no_such_model/stats", 404, "'no_such_model'"),
        ("GET", "/v2/models/no_such_model/ready", 404, "'no_such_model'"),
        ("GET", "/v2/models/versioned/versions/9", 404, "version 9"),
        ("GET", "/v2/models/versioned/versions/9/config", 404, "version 9"),
        ("GET", "/v2/models/versioned/versions/9/stats", 404, "version 9"),
        ("GET", "/v2/models/versioned/versions/x/stats", 400, "'x'"),
        ("GET", "/v2/models/broken_model", 503, "'broken_model'"),
        ("GET", "/v2/models/broken_syntax/config", 503, "'broken_syntax'"),
    ],
)
def test_bad_endpoint(client: httpx.Client, method: str, path: str, status: int, mention: str) -> None:
    response = client.request(method, path)
    assert response.status_code == status, response.text
    assert mention in _error(response)


@pytest.mark.parametrize(
    ("body", "mention"),
    [(b"{", "malformed JSON"), (b"[true]", "JSON object"), (b'{"ready": "yes"}', "'ready'")],
)
def test_bad_repository_index_request(client: httpx.Client, body: bytes, mention: str) -> None:
    response = client.post("/v2/repository/index", content=body)
    assert response.status_code == 400, response.text
    assert mention in _error(response)


def test_gzip_body_is_accepted(client: httpx.Client) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    compressed = gzip.compress(_json({"inputs": [_input(data=x.tolist())]}))
    response = client.post("/v2/models/mlp/infer", content=compressed,
                           headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    output = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(output, onnx_models.mlp_reference(x[None])[0], atol=1e-4)


def test_deflate_body_is_accepted(client: httpx.Client) -> None:
    compressed = zlib.compress(_json({"inputs": [_input(shape=(1, 3), data=[1.0, 2.0, 3.0])]}))
    response = client.post("/v2/models/identity_fp32/infer", content=compressed,
                           headers={"Content-Encoding": "deflate"})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


def test_gzip_binary_body_is_accepted(client: httpx.Client) -> None:
    x = np.arange(64, dtype=np.float32) / 64
    body, headers = _binary({"inputs": [_bin_input()]}, x.tobytes())
    # The header length counts the decompressed body, as tritonclient sends it.
    response = client.post("/v2/models/mlp/infer", content=gzip.compress(body),
                           headers={**headers, "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    output = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(output, onnx_models.mlp_reference(x[None])[0], atol=1e-4)


# -- the request size limit (its own small server) ----------------------------------------


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small_repository")
    onnx_models.write_model(root, "identity_fp32", onnx_models.identity("FP32"))
    return root


def test_body_over_the_limit_is_refused(start_server, small_repository: Path) -> None:
    limited: ServerProcess = start_server(small_repository, "--max-request-size", "1000")
    small = _json({"inputs": [_input(shape=(1, 10), data=[1.0] * 10)]})
    big = _json({"inputs": [_input(shape=(1, 400), data=[1.0] * 400)]})
    assert len(small) < 1000 < len(big)
    with httpx.Client(base_url=limited.url, timeout=TIMEOUT) as client:
        ok = client.post("/v2/models/identity_fp32/infer", content=small)
        assert ok.status_code == 200, ok.text

        # Declared too large by Content-Length: refused before the body is read.
        response = client.post("/v2/models/identity_fp32/infer", content=big)
        assert response.status_code == 413, response.text
        message = _error(response)
        assert str(len(big)) in message and "1000" in message

        # Chunked, no Content-Length: refused once the bytes read pass the limit.
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(big), 100):
                yield big[start:start + 100]

        response = client.post("/v2/models/identity_fp32/infer", content=chunks())
        assert "content-length" not in response.request.headers
        assert response.status_code == 413, response.text
        assert "1000" in _error(response)

        # Small compressed, large decompressed: the limit applies to what it inflates to.
        bomb = gzip.compress(_json({"inputs": [_input(shape=(1, 5000), data=[0.0] * 5000)]}))
        assert len(bomb) < 1000
        response = client.post("/v2/models/identity_fp32/infer", content=bomb,
                               headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413, response.text
        assert "decompressed" in _error(response)

        # And the server still serves what fits.
        ok = client.post("/v2/models/identity_fp32/infer", content=gzip.compress(small),
                         headers={"Content-Encoding": "gzip"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [1.0] * 10
    assert "Traceback" not in limited.log()


# -- after everything above -----------------------------------------------------------------


def test_server_still_healthy(client: httpx.Client, server: ServerProcess, log_offset: int) -> None:
    """Runs last in this module: the bad requests above broke nothing and logged no crash."""
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    x = np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 64)
    response = client.post("/v2/models/mlp/infer", json={"inputs": [_input(shape=(2, 64), data=x.tolist())]})
    assert response.status_code == 200, response.text
    output = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(output, onnx_models.mlp_reference(x), atol=1e-4)
    log = server.log()[log_offset:]
    assert "Traceback" not in log, log
    assert "internal server error" not in log
