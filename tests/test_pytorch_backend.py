"""The PyTorch backend through a real server: TorchScript (``pytorch_libtorch``) and
``torch.export`` models built here from tiny modules, over tritonclient HTTP and gRPC;
Triton's INPUT__0 convention and forward-argument names; dynamic batching; auto-complete
from an exported program; clear load errors; an ensemble mixing ONNX and PyTorch steps."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from inferstack.testing import onnx_models
from tests.support import ServerProcess

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save


class Affine(torch.nn.Module):
    """y = x @ W + b with fixed weights, so the expected output is computed in numpy."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 3, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(3, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TwoInTwoOut(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, (a * b).to(torch.int64)


class Failing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(5, 2)  # wrong inner dimension for x: [B, 4]


def _affine_reference(x: np.ndarray) -> np.ndarray:
    module = Affine()
    return x @ module.weight.detach().numpy() + module.bias.detach().numpy()


def _export(module: torch.nn.Module, *examples: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, examples, dynamic_shapes=tuple({0: batch} for _ in examples))
    torch.export.save(program, str(path))


def build_repository(root: Path) -> Path:
    def model(name: str, config: str, filename: str) -> Path:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        return root / name / "1" / filename

    torch.jit.save(torch.jit.script(Affine()), str(model("ts_affine", """
platform: "pytorch_libtorch"
max_batch_size: 16
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "1" } }
""", "model.pt")))
    # Inputs named after forward's arguments; outputs in declaration order.
    torch.jit.save(torch.jit.script(TwoInTwoOut()), str(model("ts_named", """
backend: "pytorch"
max_batch_size: 4
input [ { name: "b" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "a" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "PRODUCT" data_type: TYPE_INT64 dims: [ 2 ] } ]
""", "model.pt")))
    _export(Affine(), torch.zeros(2, 8), path=model("export_affine", """
backend: "pytorch"
max_batch_size: 16
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
""", "model.pt2"))
    # No inputs/outputs in the config: completed from the exported program.
    _export(TwoInTwoOut(), torch.zeros(2, 2), torch.zeros(2, 2), path=model("export_auto", """
backend: "pytorch"
max_batch_size: 8
""", "model.pt2"))
    torch.jit.save(torch.jit.script(Failing()), str(model("ts_failing", """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
""", "model.pt")))
    model("broken_file", 'platform: "pytorch_libtorch"\nmax_batch_size: 1\n'
          'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
          'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n', "model.pt").write_bytes(b"nope")
    torch.jit.save(torch.jit.script(Affine()), str(model("bad_names", """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "images" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
""", "model.pt")))
    torch.jit.save(torch.jit.script(Affine()), str(model("no_config_tensors", """
platform: "pytorch_libtorch"
max_batch_size: 4
""", "model.pt")))
    torch.jit.save(torch.jit.script(Affine()), str(model("gpu_only", """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { kind: KIND_GPU count: 1 } ]
""", "model.pt")))
    # An ensemble: ONNX add_constant(1) on 8 features, then the TorchScript affine layer.
    onnx_models.write_model(root, "onnx_add1", onnx_models.add_constant(1.0, dims=8), """
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 8 ] } ]
""")
    (root / "mixed" / "1").mkdir(parents=True)
    (root / "mixed" / "config.pbtxt").write_text("""
platform: "ensemble"
max_batch_size: 16
input [ { name: "X" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
ensemble_scheduling { step [
  { model_name: "onnx_add1" input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "shifted" } },
  { model_name: "export_affine" input_map { key: "INPUT__0" value: "shifted" }
    output_map { key: "OUTPUT__0" value: "Y" } } ] }
""")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = build_repository(tmp_path_factory.mktemp("torch_repo"))
    process = ServerProcess(root, "--no-strict-readiness",
                            log_path=tmp_path_factory.mktemp("torch_logs") / "server.log")
    yield process
    process.stop()


@pytest.mark.parametrize("model", ["ts_affine", "export_affine"])
def test_affine_over_http_and_grpc(server: ServerProcess, model: str) -> None:
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    expected = _affine_reference(x)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        assert client.is_model_ready(model)
        inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer(model, [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected, rtol=1e-5, atol=1e-5)
        meta = client.get_model_metadata(model)
        assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 3]}]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected, rtol=1e-5, atol=1e-5)
    finally:
        client.close()


def test_concurrent_requests_are_batched(server: ServerProcess) -> None:
    rows = [np.full((1, 8), i, dtype=np.float32) for i in range(12)]

    def one(x: np.ndarray) -> np.ndarray:
        with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
            inp = httpclient.InferInput("INPUT__0", [1, 8], "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("ts_affine", [inp]).as_numpy("OUTPUT__0")

    before = httpx.get(server.url + "/v2/models/ts_affine/stats").json()["model_stats"][0]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, rows))
    for x, y in zip(rows, results):
        np.testing.assert_allclose(y, _affine_reference(x), rtol=1e-5, atol=1e-5)
    after = httpx.get(server.url + "/v2/models/ts_affine/stats").json()["model_stats"][0]
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 12
    assert executions < 12, "a 20 ms queue delay with 12 concurrent requests must batch some of them"


def test_named_inputs_and_declared_output_order(server: ServerProcess) -> None:
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    b = np.array([[10, 20], [30, 40]], dtype=np.float32)
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        inputs = [httpclient.InferInput("a", [2, 2], "FP32"), httpclient.InferInput("b", [2, 2], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("ts_named", inputs)
        np.testing.assert_allclose(result.as_numpy("SUM"), a + b)
        np.testing.assert_array_equal(result.as_numpy("PRODUCT"), (a * b).astype(np.int64))
        assert result.as_numpy("PRODUCT").dtype == np.int64


def test_export_auto_complete(server: ServerProcess) -> None:
    config = httpx.get(server.url + "/v2/models/export_auto/config").json()
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("INPUT__0", "TYPE_FP32", [2]), ("INPUT__1", "TYPE_FP32", [2])]
    assert [(t["name"], t["data_type"]) for t in config["output"]] == [
        ("OUTPUT__0", "TYPE_FP32"), ("OUTPUT__1", "TYPE_INT64")]
    a = np.ones((3, 2), np.float32)
    body = {"inputs": [{"name": "INPUT__0", "shape": [3, 2], "datatype": "FP32", "data": a.ravel().tolist()},
                       {"name": "INPUT__1", "shape": [3, 2], "datatype": "FP32", "data": (2 * a).ravel().tolist()}]}
    response = httpx.post(server.url + "/v2/models/export_auto/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["OUTPUT__0"]["data"] == [3.0] * 6
    assert outputs["OUTPUT__1"]["data"] == [2] * 6 and outputs["OUTPUT__1"]["datatype"] == "INT64"


def test_runtime_error_is_500_with_the_cause(server: ServerProcess) -> None:
    body = {"inputs": [{"name": "INPUT__0", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
    response = httpx.post(server.url + "/v2/models/ts_failing/infer", json=body, timeout=30)
    assert response.status_code == 500
    error = response.json()["error"]
    assert "PyTorch model failed" in error and "cannot be multiplied" in error, error


def test_load_errors_are_clear(server: ServerProcess) -> None:
    rows = {row["name"]: row for row in httpx.post(server.url + "/v2/repository/index", json={}).json()}
    assert rows["broken_file"]["state"] == "UNAVAILABLE"
    assert "torch.jit.load cannot load the model" in rows["broken_file"]["reason"]
    assert "inputs ['images'] match no argument of the model's forward('x',)" in rows["bad_names"]["reason"]
    assert "needs the config to declare inputs and outputs" in rows["no_config_tensors"]["reason"]
    if not torch.cuda.is_available():
        assert "KIND_GPU needs CUDA" in rows["gpu_only"]["reason"]
    else:
        assert rows["gpu_only"]["state"] == "READY"


def test_ensemble_of_onnx_and_torch(server: ServerProcess) -> None:
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("X", [2, 8], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mixed", [inp])
        np.testing.assert_allclose(result.as_numpy("Y"), _affine_reference(x + 1), rtol=1e-5, atol=1e-5)
    finally:
        client.close()


# -- the backend in process: mapping rules and config errors --------------------------------


class DictOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"doubled": x * 2, "negated": -x}


def _backend_config(text: str):
    from inferstack.repository.config import parse_config_text

    return parse_config_text(text, "test")


def _instance(tmp_path: Path, module: torch.nn.Module, config_text: str):
    from inferstack.backends.base import InstanceSpec
    from inferstack.backends.pytorch import PyTorchBackend

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    config = _backend_config(config_text)
    backend = PyTorchBackend()
    backend.complete_config(config, path, strict=False)
    return backend.load(config, path, InstanceSpec("i0", "KIND_CPU"))


def test_dict_outputs_by_name(tmp_path: Path) -> None:
    instance = _instance(tmp_path, DictOut(), """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "negated" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "doubled" data_type: TYPE_FP32 dims: [ 2 ] } ]
""")
    x = np.array([[1.0, -2.0]], np.float32)
    x.flags.writeable = False  # like a view of a request body
    out = instance.execute({"x": x}, ["doubled", "negated"])
    np.testing.assert_array_equal(out["doubled"], x * 2)
    np.testing.assert_array_equal(out["negated"], -x)
    instance.unload()


def test_output_dtype_mismatch_is_named(tmp_path: Path) -> None:
    from inferstack.core.errors import InternalError

    instance = _instance(tmp_path, Affine(), """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP64 dims: [ 3 ] } ]
""")
    with pytest.raises(InternalError, match=re.escape(
            "output 'OUTPUT__0' has dtype torch.float32, the config declares torch.float64")):
        instance.execute({"INPUT__0": np.zeros((1, 8), np.float32)}, ["OUTPUT__0"])


@pytest.mark.parametrize(("config_text", "message"), [
    ("""platform: "pytorch_libtorch" max_batch_size: 4
        input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ 8 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]""",
     "TYPE_STRING is not supported by the PyTorch backend"),
    ("""platform: "pytorch_libtorch" max_batch_size: 4
        input [ { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 8 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]""",
     "input positions [1] must be 0..0 without gaps"),
    ("""platform: "pytorch_libtorch" max_batch_size: 4
        input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
        parameters { key: "DISABLE_OPTIMIZED_EXECUTION" value: { string_value: "maybe" } }""",
     "parameter 'DISABLE_OPTIMIZED_EXECUTION' must be true or false"),
    ("""platform: "pytorch_libtorch" max_batch_size: 4
        input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
        parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "-2" } }""",
     "parameter 'INTRA_OP_THREAD_COUNT' must be >= 0"),
])
def test_config_errors(tmp_path: Path, config_text: str, message: str) -> None:
    from inferstack.repository.config import ModelConfigError

    with pytest.raises(ModelConfigError, match=re.escape(message)):
        _instance(tmp_path, Affine(), config_text)
