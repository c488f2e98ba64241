"""examples/ensemble_image: the Python pre/post-processing steps (Triton Python-backend API)
checked in process, and the whole image_pipeline ensemble end to end through a real server
(Pillow decode + resize -> ResNet-18-shaped CNN in ONNX -> top-k labels) once the Python
backend is registered."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image

from inferstack.backends import BACKENDS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ensemble_image"
REPOSITORY = EXAMPLE / "model_repository"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (300, 260)) -> Image.Image:
    return Image.new("RGB", size, color)


# -- the model.py files, in process, against the part of Triton's API they use ----------------


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: object = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class _Error(Exception):
    INTERNAL, INVALID_ARG = 1, 3

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class _Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = inputs


def _api_module() -> types.ModuleType:
    """Triton's triton_python_backend_utils as far as the example uses it (Tensor, InferenceResponse,
    TritonError, get_input_tensor_by_name): enough to run the step code without a server."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor
    module.InferenceResponse = _Response
    module.TritonError = _Error
    module.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.inputs[name])
    return module


def _load_step(name: str, monkeypatch: pytest.MonkeyPatch, model_dir: Path = REPOSITORY) -> object:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _api_module())
    spec = importlib.util.spec_from_file_location(f"example_{name}", model_dir / name / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = (model_dir / name / "config.pbtxt").read_text()
    from google.protobuf import json_format

    from inferstack.repository.config import parse_config_text

    config_json = json.dumps(json_format.MessageToDict(parse_config_text(config, name), preserving_proto_field_name=True))
    model = module.TritonPythonModel()
    model.initialize({"model_config": config_json, "model_repository": str(model_dir / name),
                      "model_version": "1", "model_name": name})
    return model


def test_preprocess_decodes_resizes_and_normalises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load_step("preprocess", monkeypatch)
    rows = np.array([[encode(solid((255, 0, 0)), "PNG")], [encode(solid((0, 0, 255), (640, 480)), "JPEG")]],
                    dtype=object)
    (response,) = model.execute([_Request(IMAGE_BYTES=rows)])
    assert response.error is None
    (image,) = response.output_tensors
    array = image.as_numpy()
    assert image.name() == "IMAGE" and array.shape == (2, 3, 224, 224) and array.dtype == np.float32
    np.testing.assert_allclose(array[0, :, 100, 100], (np.array([1.0, 0.0, 0.0]) - MEAN) / STD, atol=1e-5)
    # JPEG is lossy: within a couple of levels of pure blue.
    np.testing.assert_allclose(array[1, :, 100, 100], (np.array([0.0, 0.0, 1.0]) - MEAN) / STD, atol=0.1)


def test_preprocess_refuses_what_is_not_an_image(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load_step("preprocess", monkeypatch)
    good = np.array([[encode(solid((0, 255, 0)), "PNG")]], dtype=object)
    bad = np.array([[b"definitely not an image"]], dtype=object)
    gif = np.array([[encode(solid((0, 255, 0)), "GIF")]], dtype=object)
    first, second, third = model.execute([_Request(IMAGE_BYTES=good), _Request(IMAGE_BYTES=bad),
                                          _Request(IMAGE_BYTES=gif)])
    assert first.error is None and first.output_tensors[0].as_numpy().shape == (1, 3, 224, 224)
    assert "IMAGE_BYTES is not a decodable PNG/JPEG image" in str(second.error)
    assert second.error.code == _Error.INVALID_ARG
    assert "expected a PNG or JPEG image, got GIF" in str(third.error)


def test_postprocess_top_k(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "postprocess", repository / "postprocess")
    (repository / "postprocess" / "labels.txt").write_text("".join(f"name{i}\n" for i in range(1000)))
    model = _load_step("postprocess", monkeypatch, repository)
    logits = np.zeros((2, 1000), np.float32)
    logits[0, [7, 3, 999, 500, 1, 2]] = [9, 8, 7, 6, 5, 4]
    logits[1, 42] = 20
    (response,) = model.execute([_Request(LOGITS=logits)])
    outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors}
    np.testing.assert_array_equal(outputs["CLASS_IDS"][0], [7, 3, 999, 500, 1])
    assert list(outputs["LABELS"][0]) == [b"name7", b"name3", b"name999", b"name500", b"name1"]
    assert outputs["CLASS_IDS"][1][0] == 42 and outputs["SCORES"][1][0] > 0.99
    probabilities = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(outputs["SCORES"][0], probabilities[[7, 3, 999, 500, 1]], rtol=1e-5)
    assert outputs["SCORES"].dtype == np.float32 and outputs["CLASS_IDS"].dtype == np.int64


# -- end to end, through the server ------------------------------------------------------


def _load_generate():
    """The example's generate.py under a name of its own (both examples have a generate.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ensemble_image_generate", EXAMPLE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if "python" not in BACKENDS:
        pytest.skip("the Python backend (backend: \"python\") is not registered in this build")
    from tests.support import ServerProcess

    root = tmp_path_factory.mktemp("image_pipeline") / "model_repository"
    shutil.copytree(REPOSITORY, root, ignore=shutil.ignore_patterns("model.onnx", "__pycache__"))
    generate = _load_generate()
    generate.generate(root)
    process = ServerProcess(root, log_path=tmp_path_factory.mktemp("image_logs") / "server.log")
    process.repository_root = root  # type: ignore[attr-defined]
    yield process
    process.stop()


def _expected_top5(images: list[bytes], root: Path) -> np.ndarray:
    """The same pipeline by hand: the example's preprocessing, ONNX Runtime, softmax, top 5."""
    import onnxruntime as ort

    monkeypatch = pytest.MonkeyPatch()
    try:
        model = _load_step("preprocess", monkeypatch)
        rows = np.array([[blob] for blob in images], dtype=object)
        (response,) = model.execute([_Request(IMAGE_BYTES=rows)])
    finally:
        monkeypatch.undo()
    batch = response.output_tensors[0].as_numpy()
    session = ort.InferenceSession(str(root / "resnet18" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["OUTPUT0"], {"INPUT0": batch})
    return np.argsort(-logits, axis=1, kind="stable")[:, :5]


def test_pipeline_end_to_end(pipeline_server) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server = pipeline_server
    images = [encode(solid((200, 30, 30)), "PNG"), encode(solid((10, 80, 220), (500, 300)), "JPEG")]
    data = np.array([[blob] for blob in images], dtype=object)
    expected = _expected_top5(images, server.repository_root)
    for module, url in ((httpclient, server.url.removeprefix("http://")), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(url)
        try:
            tensor = module.InferInput("IMAGE_BYTES", list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            result = client.infer("image_pipeline", [tensor])
        finally:
            client.close()
        class_ids, scores, labels = (result.as_numpy(n) for n in ("CLASS_IDS", "SCORES", "LABELS"))
        assert class_ids.shape == (2, 5) and scores.shape == (2, 5) and labels.shape == (2, 5)
        np.testing.assert_array_equal(class_ids, expected)
        assert [label.decode() for label in labels[0]] == [f"class_{i:03d}" for i in class_ids[0]]
        assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores.sum(axis=1) <= 1.0001)


def test_pipeline_bad_image_names_the_step(pipeline_server) -> None:
    import httpx

    server = pipeline_server
    body = {"inputs": [{"name": "IMAGE_BYTES", "shape": [1, 1], "datatype": "BYTES", "data": ["not an image"]}]}
    response = httpx.post(server.url + "/v2/models/image_pipeline/infer", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "step 0 (model 'preprocess') failed" in error and "not a decodable PNG/JPEG image" in error
    stats = {s["name"]: s for s in httpx.get(server.url + "/v2/models/stats", timeout=30).json()["model_stats"]}
    for name in ("image_pipeline", "preprocess", "resnet18", "postprocess"):
        assert stats[name]["inference_stats"]["success"]["count"] >= 1, name
