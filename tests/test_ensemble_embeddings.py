"""examples/ensemble_embeddings end to end: tokenizer (Python) -> MiniLM-shaped encoder
(PyTorch, torch.export) -> mean pooling (Python) as one ensemble, over HTTP and gRPC,
checked against the same computation done here, including padding within a batch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inferstack.backends import BACKENDS
from tests.support import ServerProcess
from tests.test_ensemble_image import _load_step, _Request

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ensemble_embeddings"
TEXTS = [b"the quick brown fox", b"an inference server batches every tensor it can, even zebras!"]


def _load_generate():
    """The example's generate.py under a name of its own (both examples have a generate.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ensemble_embeddings_generate", EXAMPLE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embeddings") / "model_repository"
    shutil.copytree(EXAMPLE / "model_repository", root, ignore=shutil.ignore_patterns("model.pt2", "__pycache__"))
    generate = _load_generate()
    generate.generate(root, layers=2)  # the same interface as the 6-layer model, faster to export
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if "python" not in BACKENDS:
        pytest.skip("the Python backend (backend: \"python\") is not registered in this build")
    process = ServerProcess(repository, log_path=tmp_path_factory.mktemp("embeddings_logs") / "server.log")
    yield process
    process.stop()


def _reference(repository: Path, texts: list[bytes]) -> np.ndarray:
    """Each text on its own (no padding): the example's tokenizer, the exported encoder, mean + L2."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        tokenizer = _load_step("tokenizer", monkeypatch, repository)
    finally:
        monkeypatch.undo()
    encoder = torch.export.load(str(repository / "minilm" / "1" / "model.pt2")).module()
    vectors = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text.decode())], dtype=torch.int64)
        with torch.inference_mode():
            hidden = encoder(ids, torch.ones_like(ids)).numpy()[0]
        mean = hidden.mean(axis=0)
        vectors.append(mean / np.linalg.norm(mean))
    return np.stack(vectors)


def test_tokenizer_wordpiece(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _load_step("tokenizer", monkeypatch, repository)
    vocab = {token: index for index, token in enumerate((repository / "tokenizer" / "vocab.txt").read_text().split("\n"))}
    ids = tokenizer.encode("The zebra, ok")
    # "zebra" is not a word of the vocabulary: greedy longest match into pieces.
    assert ids == [vocab["[CLS]"], vocab["the"], vocab["z"], vocab["##e"], vocab["##b"], vocab["##r"], vocab["##a"],
                   vocab[","], vocab["o"], vocab["##k"], vocab["[SEP]"]]
    rows = np.array([[b"one"], [b"two word here"]], dtype=object)
    (response,) = tokenizer.execute([_Request(TEXT=rows)])
    outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors}
    assert outputs["INPUT_IDS"].shape == (2, 5) and outputs["INPUT_IDS"].dtype == np.int64
    np.testing.assert_array_equal(outputs["ATTENTION_MASK"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert outputs["INPUT_IDS"][0, 3] == vocab["[PAD]"]
    (bad,) = tokenizer.execute([_Request(TEXT=np.array([[b"\xff\xfe"]], dtype=object))])
    assert "TEXT is not valid UTF-8" in str(bad.error)


def test_embeddings_end_to_end(server: ServerProcess, repository: Path) -> None:
    import httpx
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    expected = _reference(repository, TEXTS)
    data = np.array([[text] for text in TEXTS], dtype=object)
    for module, url in ((httpclient, server.url.removeprefix("http://")), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(url)
        try:
            tensor = module.InferInput("TEXT", [2, 1], "BYTES")
            tensor.set_data_from_numpy(data)
            together = client.infer("embeddings", [tensor]).as_numpy("EMBEDDING")
            alone = module.InferInput("TEXT", [1, 1], "BYTES")
            alone.set_data_from_numpy(data[:1])
            first = client.infer("embeddings", [alone]).as_numpy("EMBEDDING")
        finally:
            client.close()
        assert together.shape == (2, 384) and together.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
        # The short text was padded to the long one's length in the batch: the mask must hide it.
        np.testing.assert_allclose(together[0], first[0], atol=1e-5)
        np.testing.assert_allclose(together, expected, atol=1e-4)
    stats = {s["name"]: s for s in httpx.get(server.url + "/v2/models/stats", timeout=30).json()["model_stats"]}
    for name in ("embeddings", "tokenizer", "minilm", "pooling"):
        assert stats[name]["inference_stats"]["success"]["count"] == 4, name
