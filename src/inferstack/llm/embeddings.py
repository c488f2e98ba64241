"""Embedding models: an ONNX encoder plus its tokenizer (``backend: "embedding"``).

A repository entry::

    minilm/
      config.pbtxt     backend: "embedding", pooling and normalisation in parameters
      1/model/         model.onnx + tokenizer.json (from scripts/export_minilm.py)

The instance tokenizes (Rust ``tokenizers``, no torch), runs the encoder with
ONNX Runtime, pools (``mean`` over the attention mask, or ``cls``) and
normalises (L2, by default). It is an ordinary batching model behind the
dynamic batcher: ``/v2/models/{m}/infer`` takes ``text`` (BYTES) and returns
``embedding`` (FP32) and ``token_count`` (INT32), and ``POST /v1/embeddings``
sends its inputs through that same path, so concurrent embedding requests are
batched together.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.core.errors import CancelledError
from inferstack.core.types import InferenceRequest
from inferstack.repository.config import ModelConfigError, parameter

DEFAULT_MAX_BATCH_SIZE = 64


def _settings(config: mc.ModelConfig) -> tuple[str, bool, int]:
    pooling = parameter(config, "pooling") or "mean"
    if pooling not in ("mean", "cls"):
        raise ModelConfigError(f"parameter 'pooling' must be 'mean' or 'cls', got {pooling!r}")
    normalize = (parameter(config, "normalize") or "true").lower()
    if normalize not in ("true", "false"):
        raise ModelConfigError(f"parameter 'normalize' must be 'true' or 'false', got {normalize!r}")
    raw = parameter(config, "max_length") or "256"
    try:
        max_length = int(raw)
    except ValueError:
        raise ModelConfigError(f"parameter 'max_length' must be an integer, got {raw!r}") from None
    if max_length < 1:
        raise ModelConfigError(f"parameter 'max_length' must be >= 1, got {max_length}")
    return pooling, normalize == "true", max_length


def _session(model_path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(model_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelConfigError(f"{model_path}/model.onnx: ONNX Runtime cannot load the model: {exc}") from None


def load_tokenizer(model_path: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    path = model_path / "tokenizer.json"
    if not path.is_file():
        raise ModelConfigError(f"{model_path}: no tokenizer.json next to model.onnx")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        pad_id = tokenizer.token_to_id("<pad>") or 0
    tokenizer.enable_padding(pad_id=pad_id)
    return tokenizer


class EmbeddingBackend(Backend):
    name = "embedding"
    default_model_filename = "model"

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        if not (model_path / "model.onnx").is_file():
            raise ModelConfigError(f"{model_path}: an embedding model keeps model.onnx and tokenizer.json in "
                                   "<version>/model/ (see scripts/export_minilm.py)")
        _settings(config)
        session = _session(model_path, 1)
        shape = session.get_outputs()[0].shape
        del session
        dim = shape[-1] if isinstance(shape[-1], int) and shape[-1] > 0 else -1
        if not config.input:
            config.input.add(name="text", data_type=mc.TYPE_STRING, dims=[1])
        if not config.output:
            config.output.add(name="embedding", data_type=mc.TYPE_FP32, dims=[dim])
            config.output.add(name="token_count", data_type=mc.TYPE_INT32, dims=[1])
        if config.max_batch_size == 0 and not strict:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not config.HasField("dynamic_batching"):
                config.dynamic_batching.SetInParent()

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        from inferstack.backends.resources import int_parameter, usable_cores

        pooling, normalize, max_length = _settings(config)
        threads = int_parameter(config, "intra_op_thread_count") or max(
            1, usable_cores() // max(1, instance.total_instances))
        return EmbeddingInstance(_session(model_path, threads), load_tokenizer(model_path, max_length),
                                 pooling, normalize)


class Embedder:
    """Tokenize, encode, pool, normalise: the same steps for the server and the benchmark's baseline."""

    def __init__(self, session: Any, tokenizer: Any, pooling: str, normalize: bool) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_name = session.get_outputs()[0].name

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        hidden = self.session.run([self.output_name], feeds)[0]
        if hidden.ndim == 2:  # the model pools itself
            pooled = hidden
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[:, :, None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        pooled = pooled.astype(np.float32)
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled, mask.sum(axis=1).astype(np.int32)


class EmbeddingInstance(ModelInstance):
    def __init__(self, session: Any, tokenizer: Any, pooling: str, normalize: bool) -> None:
        self.embedder = Embedder(session, tokenizer, pooling, normalize)

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        texts = inputs["text"].reshape(-1)
        decoded = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in texts]
        vectors, counts = self.embedder.embed(decoded)
        return {"embedding": vectors, "token_count": counts[:, None]}

    def unload(self) -> None:
        self.embedder.session = None


async def embeddings_response(manager: Any, body: dict[str, Any],
                              receive: Callable[[], Awaitable[dict]]) -> dict[str, Any]:
    """``POST /v1/embeddings``: every input through the model's batcher, in chunks of max_batch_size."""
    import asyncio

    from inferstack.llm.http_api import FieldError, _cancel_on_disconnect

    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise FieldError("model", "'model' must be a non-empty string")
    version = manager.get(name)
    if version.config.backend != "embedding":
        raise FieldError("model", f"model {name!r} is not an embedding model (backend: \"embedding\")")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise FieldError("input", "'input' must be a string or a non-empty list of strings "
                                  "(token arrays are not supported)")
    if any(not t for t in texts):
        raise FieldError("input", "'input' must not contain empty strings")
    if len(texts) > 2048:
        raise FieldError("input", f"'input' may hold at most 2048 strings, got {len(texts)}")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise FieldError("encoding_format", f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
    dimensions = body.get("dimensions")
    step = max(1, version.max_batch_size)
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]

    async def run(chunk: list[str]) -> Any:
        array = np.array([[t.encode("utf-8")] for t in chunk], dtype=np.object_)
        return await version.infer(InferenceRequest(model_name=name, inputs={"text": array}))

    responses = await _cancel_on_disconnect(receive, asyncio.gather(*(run(c) for c in chunks)))
    if responses is None:
        raise CancelledError("client disconnected; request aborted")
    vectors = np.concatenate([r.outputs["embedding"] for r in responses])
    tokens = int(sum(int(r.outputs["token_count"].sum()) for r in responses))
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise FieldError("dimensions", f"model {name!r} has {vectors.shape[1]} dimensions; 'dimensions' "
                                       f"{dimensions!r} is not supported")
    data = []
    for index, vector in enumerate(vectors):
        value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64" \
            else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
