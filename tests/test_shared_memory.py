"""System shared memory: the region registry on its own, then end to end with NVIDIA's client.

The end-to-end half uses ``tritonclient.http`` and ``tritonclient.utils.shared_memory``
exactly as Triton's own examples do. Keys carry a random suffix (other test runs
share ``/dev/shm``) and every region created here is destroyed.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    serialized_byte_size,
)

from inferstack.core.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from inferstack.protocol.shared_memory import SystemSharedMemory, shared_memory_reference
from inferstack.testing.onnx_models import mlp_reference
from tests.support import ServerProcess

TIMEOUT = 60.0


def _key(tag: str) -> str:
    return f"/inferstack_test_{uuid.uuid4().hex[:12]}_{tag}"


@pytest.fixture
def regions() -> Iterator:
    """Create shared memory objects; every one is destroyed after the test."""
    created: list = []

    def create(tag: str, byte_size: int):
        key = _key(tag)
        handle = shm.create_shared_memory_region(tag, key, byte_size)
        created.append(handle)
        return handle, key

    yield create
    for handle in created:
        shm.destroy_shared_memory_region(handle)


# -- the registry on its own ----------------------------------------------------------------


def test_reference_parameters() -> None:
    assert shared_memory_reference({"binary_data": True}, "input 'X'") is None
    ref = shared_memory_reference({"shared_memory_region": "r", "shared_memory_byte_size": 8}, "x")
    assert ref == ("r", 0, 8)
    assert ref.parameters() == {"shared_memory_region": "r", "shared_memory_byte_size": 8}
    assert shared_memory_reference(
        {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 4}, "x"
    ).parameters()["shared_memory_offset"] == 4
    with pytest.raises(InvalidArgumentError, match="input 'X'.*needs 'shared_memory_byte_size'"):
        shared_memory_reference({"shared_memory_region": "r"}, "input 'X'")
    with pytest.raises(InvalidArgumentError, match="'shared_memory_region' must be a non-empty string"):
        shared_memory_reference({"shared_memory_byte_size": 8}, "input 'X'")
    with pytest.raises(InvalidArgumentError, match="'shared_memory_offset' must be a non-negative integer"):
        shared_memory_reference(
            {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": -1}, "x"
        )


def test_register_validates_key_bounds_and_duplicates(regions) -> None:
    handle, key = regions("reg", 64)
    registry = SystemSharedMemory(enabled=True)
    with pytest.raises(InvalidArgumentError, match="cannot open shared memory object"):
        registry.register("a", _key("missing"), 0, 8)
    for bad in ("/../etc/passwd", "/a/b", "", "/"):
        with pytest.raises(InvalidArgumentError, match="invalid key"):
            registry.register("a", bad, 0, 8)
    with pytest.raises(InvalidArgumentError, match="offset 60 \\+ byte_size 8 is beyond the 64 bytes"):
        registry.register("a", key, 60, 8)
    with pytest.raises(InvalidArgumentError, match="'byte_size' must be positive"):
        registry.register("a", key, 0, 0)
    registry.register("a", key, 8, 56)
    registry.register("b", key.lstrip("/"), 0, 64)  # the same object under a second name, key without '/'
    with pytest.raises(AlreadyExistsError, match="'a' is already registered"):
        registry.register("a", key, 0, 8)
    assert registry.status() == [
        {"name": "a", "key": key, "offset": 8, "byte_size": 56},
        {"name": "b", "key": key.lstrip("/"), "offset": 0, "byte_size": 64},
    ]
    assert registry.status("b") == [{"name": "b", "key": key.lstrip("/"), "offset": 0, "byte_size": 64}]
    with pytest.raises(NotFoundError, match="unknown shared memory region 'c'"):
        registry.status("c")
    registry.unregister("c")  # unknown: no error, as in Triton
    registry.unregister("a")
    assert [r["name"] for r in registry.status()] == ["b"]
    registry.unregister()
    assert registry.status() == []


def test_disabled_registry_refuses_registration(regions) -> None:
    _, key = regions("off", 64)
    registry = SystemSharedMemory()
    with pytest.raises(UnsupportedError, match="--allow-client-shm"):
        registry.register("a", key, 0, 64)
    assert registry.status() == []
    registry.unregister()
    with registry.lease() as lease, pytest.raises(UnsupportedError, match="input 'X'.*--allow-client-shm"):
        lease.read_input("a", 0, 4, "FP32", (1,), tensor="X")


def test_read_is_a_zero_copy_view_and_write_copies_in(regions) -> None:
    handle, key = regions("rw", 4096 + 128)
    base = 4096 + 24  # the region starts off a page boundary: the mapping must still line up
    data = np.arange(16, dtype=np.float32)
    shm.set_shared_memory_region(handle, [data], offset=base + 8)
    registry = SystemSharedMemory(enabled=True)
    registry.register("r", key, base, 64)
    with registry.lease() as lease:
        array = lease.read_input("r", 8, 56, "FP32", (14,), tensor="X")
        np.testing.assert_array_equal(array, data[:14])
        assert not array.flags.writeable
        assert not array.flags.owndata  # a view of the mapping, not a copy
        data[0] = 42.0
        shm.set_shared_memory_region(handle, [data], offset=base + 8)
        assert array[0] == 42.0  # it *is* the shared memory
        with pytest.raises(InvalidArgumentError, match="needs 56 bytes, shared_memory_byte_size in region 'r' is 52"):
            lease.read_input("r", 8, 52, "FP32", (14,), tensor="X")
        with pytest.raises(InvalidArgumentError, match="input 'X': shared_memory_offset 60 \\+ "
                                                       "shared_memory_byte_size 8 is beyond shared memory region 'r' of 64 bytes"):
            lease.read_input("r", 60, 8, "FP32", (2,), tensor="X")
        out = np.array([[1.5, 2.5], [3.5, 4.5]], dtype=np.float32)
        assert lease.write_output("r", 0, 16, out, "FP32", tensor="Y") == 16
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [2, 2], offset=base), out)
        with pytest.raises(InvalidArgumentError, match="output 'Y': 16 bytes do not fit in shared memory region 'r' "
                                                       "\\(shared_memory_byte_size 12 at shared_memory_offset 0\\)"):
            lease.write_output("r", 0, 12, out, "FP32", tensor="Y")
        strings = np.array([b"a", b"", b"xyz"], dtype=np.object_)
        assert lease.write_output("r", 16, 48, strings, "BYTES", tensor="S") == 4 * 3 + 4
        back = lease.read_input("r", 16, 16, "BYTES", (3,), tensor="S")
        assert back.tolist() == [b"a", b"", b"xyz"]
    registry.unregister()


def test_unregister_while_in_use_closes_after_the_last_user(regions) -> None:
    handle, key = regions("busy", 64)
    shm.set_shared_memory_region(handle, [np.ones(16, dtype=np.float32)])
    registry = SystemSharedMemory(enabled=True)
    registry.register("r", key, 0, 64)
    lease = registry.lease()
    array = lease.read_input("r", 0, 64, "FP32", (16,), tensor="X")
    registry.unregister("r")
    assert registry.status() == []
    registry.register("r", key, 0, 32)  # the name is free again at once
    # The old mapping still serves the request that holds it.
    np.testing.assert_array_equal(array, np.ones(16, dtype=np.float32))
    lease.write_output("r", 0, 64, np.full(16, 2, dtype=np.float32), "FP32", tensor="Y")
    lease.release()
    # Closed now, but ``array`` still views it: the mapping lives on until the array goes.
    np.testing.assert_array_equal(array, np.full(16, 2, dtype=np.float32))
    del array
    gc.collect()
    with registry.lease() as lease:
        assert lease.read_input("r", 0, 32, "FP32", (8,), tensor="X").tolist() == [2.0] * 8
    registry.unregister()


def test_truncated_object_is_refused_not_a_crash(regions) -> None:
    handle, key = regions("shrink", 8192)
    registry = SystemSharedMemory(enabled=True)
    registry.register("r", key, 4096, 4096)
    Path("/dev/shm", key.lstrip("/")).open("r+b").truncate(4096)
    with registry.lease() as lease, pytest.raises(InvalidArgumentError, match="shrank to 4096 bytes"):
        lease.read_input("r", 0, 16, "FP32", (4,), tensor="X")
    registry.unregister()


# -- end to end with tritonclient ------------------------------------------------------------


@pytest.fixture(scope="module")
def shm_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("logs") / "shm_server.log"
    process = ServerProcess(model_repository, "--no-strict-readiness", "--allow-client-shm", log_path=log_path)
    yield process
    process.stop()


@pytest.fixture
def client(shm_server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(
        url=f"127.0.0.1:{shm_server.http_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    client.unregister_system_shared_memory()
    yield client
    client.unregister_system_shared_memory()
    client.close()


def test_server_metadata_lists_the_extension(client) -> None:
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


def test_infer_mlp_inputs_and_outputs_in_shared_memory(client, regions) -> None:
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    in_handle, in_key = regions("mlp_in", x.nbytes)
    out_handle, out_key = regions("mlp_out", 4 * 10 * 4)
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory("mlp_in", in_key, x.nbytes)
    client.register_system_shared_memory("mlp_out", out_key, 160)

    tensor = httpclient.InferInput("INPUT0", [4, 64], "FP32")
    tensor.set_shared_memory("mlp_in", x.nbytes)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    output.set_shared_memory("mlp_out", 160)
    result = client.infer("mlp", [tensor], outputs=[output])

    answer = result.get_output("OUTPUT0")
    assert answer["parameters"] == {"shared_memory_region": "mlp_out", "shared_memory_byte_size": 160}
    assert "data" not in answer and answer["shape"] == [4, 10] and answer["datatype"] == "FP32"
    got = shm.get_contents_as_numpy(out_handle, np.float32, [4, 10])
    np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)


def test_infer_add_sub_offsets_in_one_region_each(client, regions) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    in_handle, in_key = regions("as_in", 2 * a.nbytes + 128)
    out_handle, out_key = regions("as_out", 2 * a.nbytes)
    shm.set_shared_memory_region(in_handle, [a], offset=64)
    shm.set_shared_memory_region(in_handle, [b], offset=64 + a.nbytes)
    # The region itself starts 64 bytes into the object.
    client.register_system_shared_memory("as_in", in_key, 2 * a.nbytes, offset=64)
    client.register_system_shared_memory("as_out", out_key, 2 * a.nbytes)
    status = client.get_system_shared_memory_status()
    assert {"name": "as_in", "key": in_key, "offset": 64, "byte_size": 2 * a.nbytes} in status
    assert client.get_system_shared_memory_status("as_out") == [
        {"name": "as_out", "key": out_key, "offset": 0, "byte_size": 2 * a.nbytes}
    ]

    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_shared_memory("as_in", a.nbytes)
    inputs[1].set_shared_memory("as_in", b.nbytes, offset=a.nbytes)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("as_out", a.nbytes, offset=a.nbytes)  # swapped on purpose
    outputs[1].set_shared_memory("as_out", a.nbytes)
    result = client.infer("add_sub", inputs, outputs=outputs)
    assert result.get_output("OUTPUT0")["parameters"]["shared_memory_offset"] == a.nbytes
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [2, 16], offset=a.nbytes), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [2, 16]), a - b)

    # Mixed: one input in shared memory, one in the body; outputs in the body.
    inputs[1] = httpclient.InferInput("INPUT1", [2, 16], "FP32")
    inputs[1].set_data_from_numpy(b, binary_data=True)
    result = client.infer("add_sub", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_bytes_tensors_through_shared_memory(client, regions) -> None:
    items = np.array([b"hello", b"", b"\xe2\x82\xac uro"], dtype=np.object_).reshape(1, 3)
    raw = serialize_byte_tensor(items)
    size = serialized_byte_size(raw)
    in_handle, in_key = regions("str_in", size)
    out_handle, out_key = regions("str_out", 256)
    shm.set_shared_memory_region(in_handle, [raw])
    client.register_system_shared_memory("str_in", in_key, size)
    client.register_system_shared_memory("str_out", out_key, 256)
    tensor = httpclient.InferInput("INPUT0", [1, 3], "BYTES")
    tensor.set_shared_memory("str_in", size)
    output = httpclient.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory("str_out", 256)
    client.infer("identity_bytes", [tensor], outputs=[output])
    got = shm.get_contents_as_numpy(out_handle, np.object_, [1, 3])
    assert got.tolist() == items.tolist()
    assert deserialize_bytes_tensor(raw.item()).tolist() == items.reshape(-1).tolist()


def _error(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value)


def test_errors_name_the_region_and_field(client, regions) -> None:
    x = np.ones((1, 64), dtype=np.float32)
    handle, key = regions("err", 512)
    shm.set_shared_memory_region(handle, [x])

    assert "cannot open shared memory object" in _error(
        lambda: client.register_system_shared_memory("nokey", _key("missing"), 64))
    assert "offset 0 + byte_size 1024 is beyond the 512 bytes" in _error(
        lambda: client.register_system_shared_memory("big", key, 1024))
    client.register_system_shared_memory("err", key, 512)
    assert "'err' is already registered" in _error(lambda: client.register_system_shared_memory("err", key, 64))
    assert "unknown shared memory region 'nope'" in _error(lambda: client.get_system_shared_memory_status("nope"))

    def infer(region: str, byte_size: int, offset: int = 0, out: tuple[str, int] | None = None):
        tensor = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        tensor.set_shared_memory(region, byte_size, offset)
        outputs = None
        if out is not None:
            outputs = [httpclient.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory(*out)
        return lambda: client.infer("mlp", [tensor], outputs=outputs)

    assert "input 'INPUT0': unknown shared memory region 'nope'" in _error(infer("nope", 256))
    assert ("input 'INPUT0': shared_memory_offset 384 + shared_memory_byte_size 256 is beyond "
            "shared memory region 'err' of 512 bytes") in _error(infer("err", 256, offset=384))
    assert "needs 256 bytes, shared_memory_byte_size in region 'err' is 128" in _error(infer("err", 128))
    # The output region is checked before the model runs ...
    assert "output 'OUTPUT0': unknown shared memory region 'gone'" in _error(infer("err", 256, out=("gone", 40)))
    # ... and its size when the output is there: 1x10 FP32 is 40 bytes.
    assert ("output 'OUTPUT0': 40 bytes do not fit in shared memory region 'err' "
            "(shared_memory_byte_size 32 at shared_memory_offset 256)") in _error(
        infer("err", 256, out=("err", 32, 256)))
    infer("err", 256, out=("err", 40, 256))()
    np.testing.assert_allclose(shm.get_contents_as_numpy(handle, np.float32, [1, 10], offset=256),
                               mlp_reference(x), rtol=1e-4, atol=1e-5)


def test_unregister_all(client, regions) -> None:
    _, key = regions("all", 64)
    for name in ("u1", "u2", "u3"):
        client.register_system_shared_memory(name, key, 64)
    client.unregister_system_shared_memory("u2")
    assert sorted(r["name"] for r in client.get_system_shared_memory_status()) == ["u1", "u3"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_request_body_mistakes_are_400(shm_server: ServerProcess, regions) -> None:
    _, key = regions("raw", 256)
    base = shm_server.url + "/v2/systemsharedmemory"
    with httpx.Client(timeout=TIMEOUT) as http:
        assert http.post(f"{base}/region/r/register", json={"offset": 0, "byte_size": 8}).status_code == 400
        bad = http.post(f"{base}/region/r/register", json={"key": key, "offset": 0, "byte_size": "8"})
        assert bad.status_code == 400 and "'byte_size' must be a non-negative integer" in bad.json()["error"]
        assert http.post(f"{base}/region/r/register", json={"key": key, "byte_size": 256}).status_code == 200
        assert http.post(f"{base}/status").json() == [{"name": "r", "key": key, "offset": 0, "byte_size": 256}]
        # An input cannot take its data from the body and from shared memory at once.
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64,
                            "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 256}}]}
        response = http.post(shm_server.url + "/v2/models/mlp/infer", json=body)
        assert response.status_code == 400 and "has 'shared_memory_region' and also data" in response.json()["error"]
        assert http.post(f"{base}/region/r/unregister").status_code == 200
        assert http.get(f"{base}/status").json() == []


def test_cuda_shared_memory_is_refused_clearly(shm_server: ServerProcess) -> None:
    base = shm_server.url + "/v2/cudasharedmemory"
    with httpx.Client(timeout=TIMEOUT) as http:
        response = http.post(f"{base}/region/c/register", json={"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 8})
        assert response.status_code == 400
        assert "CUDA shared memory is not supported" in response.json()["error"]
        assert http.get(f"{base}/status").json() == []
        assert http.get(f"{base}/region/c/status").status_code == 404
        assert http.post(f"{base}/unregister").status_code == 200
        assert http.post(f"{base}/region/c/unregister").status_code == 200


def test_disabled_by_default(server: ServerProcess, regions) -> None:
    """The shared test server runs without --allow-client-shm."""
    _, key = regions("dflt", 64)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}", network_timeout=TIMEOUT)
    try:
        assert "--allow-client-shm" in _error(lambda: client.register_system_shared_memory("d", key, 64))
        assert client.get_system_shared_memory_status() == []
        client.unregister_system_shared_memory()
        tensor = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        tensor.set_shared_memory("d", 256)
        assert "--allow-client-shm" in _error(lambda: client.infer("mlp", [tensor]))
    finally:
        client.close()


# -- over gRPC, with tritonclient.grpc ------------------------------------------------------------


def test_grpc_shared_memory_inputs_outputs_and_status(shm_server: ServerProcess, regions) -> None:
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    in_handle, in_key = regions("g_in", x.nbytes)
    out_handle, out_key = regions("g_out", 2 * 10 * 4)
    shm.set_shared_memory_region(in_handle, [x])
    with grpcclient.InferenceServerClient(shm_server.grpc_url) as client:
        client.unregister_system_shared_memory()
        try:
            client.register_system_shared_memory("g_in", in_key, x.nbytes)
            client.register_system_shared_memory("g_out", out_key, 80)
            status = client.get_system_shared_memory_status(as_json=True)["regions"]
            assert set(status) == {"g_in", "g_out"} and status["g_in"]["key"] == in_key
            tensor = grpcclient.InferInput("INPUT0", [2, 64], "FP32")
            tensor.set_shared_memory("g_in", x.nbytes)
            output = grpcclient.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory("g_out", 80)
            result = client.infer("mlp", [tensor], outputs=[output])
            answer = result.get_output("OUTPUT0")
            assert answer.parameters["shared_memory_region"].string_param == "g_out"
            got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 10])
            np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
            # A raw input beside a shared memory output still decodes (raw entries skip shm inputs).
            raw_input = grpcclient.InferInput("INPUT0", [2, 64], "FP32")
            raw_input.set_data_from_numpy(x)
            again = client.infer("mlp", [raw_input], outputs=[output])
            assert again.get_output("OUTPUT0").parameters["shared_memory_byte_size"].int64_param == 80
            with pytest.raises(InferenceServerException) as info:
                client.register_system_shared_memory("g_in", in_key, x.nbytes)
            assert info.value.status() == "StatusCode.ALREADY_EXISTS"
            missing = grpcclient.InferInput("INPUT0", [2, 64], "FP32")
            missing.set_shared_memory("nope", x.nbytes)
            with pytest.raises(InferenceServerException) as info:
                client.infer("mlp", [missing])
            assert info.value.status() == "StatusCode.NOT_FOUND" and "nope" in info.value.message()
        finally:
            client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
