"""The ``transformers`` backend: generation models served by :class:`LLMEngine`.

A repository entry::

    my_llm/
      config.pbtxt          backend: "transformers", engine settings in parameters
      1/model/              a Hugging Face folder: config.json, tokenizer, *.safetensors

The backend fits the server's per-batch interface without changing it: each
instance owns an engine (``instance.engine``), which the OpenAI and generate
routes find through ``ModelVersion.engines``. ``execute`` — what
``/v2/models/{m}/infer`` and gRPC ``ModelInfer`` call — accepts a text input
(``text_input`` BYTES, optional ``sampling_parameters`` BYTES holding JSON)
and answers ``text_output``, the layout of Triton's vLLM backend; each row is
submitted to the engine, so rows of a batch are batched continuously too.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.core.errors import InferenceServerError, InvalidArgumentError
from inferstack.repository.config import ModelConfigError, parameter

log = logging.getLogger("inferstack.llm")

#: Version-directory folder that holds the Hugging Face model, unless ``default_model_filename`` names another.
DEFAULT_MODEL_DIR = "model"
_IMPORT_LOCK = threading.Lock()


def _int(config: mc.ModelConfig, key: str, default: int, minimum: int = 0) -> int:
    value = parameter(config, key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ModelConfigError(f"parameter {key!r} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ModelConfigError(f"parameter {key!r} must be >= {minimum}, got {number}")
    return number


def _float(config: mc.ModelConfig, key: str, default: float) -> float:
    value = parameter(config, key)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ModelConfigError(f"parameter {key!r} must be a number, got {value!r}") from None


def engine_settings(config: mc.ModelConfig, instance: InstanceSpec | None = None) -> Any:
    """Engine settings from ``parameters`` (names documented in docs/llm.md)."""
    from inferstack.llm.engine import EngineSettings

    policy = parameter(config, "scheduling_policy") or "continuous"
    if policy not in ("continuous", "static"):
        raise ModelConfigError(f"parameter 'scheduling_policy' must be 'continuous' or 'static', got {policy!r}")
    dtype = parameter(config, "dtype") or "auto"
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ModelConfigError(f"parameter 'dtype' must be auto, float32, float16 or bfloat16, got {dtype!r}")
    max_num_seqs = _int(config, "max_num_seqs", 8, 1)
    device = "cpu"
    if instance is not None and instance.kind == "KIND_GPU":
        device = f"cuda:{instance.device_id}"
    return EngineSettings(
        max_num_seqs=max_num_seqs,
        max_model_len=_int(config, "max_model_len", 0, 0),
        max_num_batched_tokens=_int(config, "max_num_batched_tokens", max(512, max_num_seqs), 1),
        max_waiting=_int(config, "max_waiting_requests", 256, 0),
        policy=policy,
        dtype=dtype,
        device=device,
        torch_threads=_int(config, "torch_threads", 0, 0),
        default_max_tokens=_int(config, "default_max_tokens", 16, 1),
        default_temperature=_float(config, "default_temperature", 1.0),
        default_top_p=_float(config, "default_top_p", 1.0),
        default_top_k=_int(config, "default_top_k", 0, 0),
        default_timeout_s=_float(config, "request_timeout_seconds", 0.0),
    )


def _add_tensor(tensors: Any, name: str, datatype: int, optional: bool = False) -> None:
    if any(t.name == name for t in tensors):
        return
    tensor = tensors.add(name=name, data_type=datatype, dims=[1])
    if optional:
        tensor.optional = True


class TransformersBackend(Backend):
    name = "transformers"
    default_model_filename = DEFAULT_MODEL_DIR

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        if not (model_path / "config.json").is_file():
            raise ModelConfigError(
                f"{model_path}: not a Hugging Face model folder (no config.json); a generation model keeps "
                f"its model folder in <version>/{DEFAULT_MODEL_DIR}/ (or the folder default_model_filename names)"
            )
        if not any(model_path.glob("*.safetensors")) and not any(model_path.glob("*.bin")):
            raise ModelConfigError(f"{model_path}: no weights (*.safetensors) in the model folder")
        settings = engine_settings(config)
        for group in config.instance_group:
            if group.count > 1:
                raise ModelConfigError(
                    "a generation model runs one engine per device; use max_num_seqs for concurrency "
                    f"instead of instance_group count {group.count}"
                )
        # The /infer view of the model: text in, text out (Triton's vLLM backend layout).
        if not config.input:
            _add_tensor(config.input, "text_input", mc.TYPE_STRING)
            _add_tensor(config.input, "sampling_parameters", mc.TYPE_STRING, optional=True)
        if not config.output:
            _add_tensor(config.output, "text_output", mc.TYPE_STRING)
        if config.max_batch_size == 0 and not strict:
            config.max_batch_size = settings.max_num_seqs
            if not config.HasField("dynamic_batching"):
                config.dynamic_batching.SetInParent()

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        engine = build_engine(config, model_path, instance)
        return GenerationInstance(engine, config)


def build_engine(config: mc.ModelConfig, model_path: Path, instance: InstanceSpec | None = None) -> Any:
    """Load the tokenizer and weights and start an engine (slow: call off the event loop)."""
    try:
        # transformers' lazy module is not safe to import from two threads at once
        # (models load concurrently): the first import happens under a lock.
        with _IMPORT_LOCK:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelConfigError(
            f"backend 'transformers' needs torch and transformers: pip install 'inferstack[llm]' ({exc})"
        ) from None
    from transformers.utils import logging as hf_logging

    from inferstack.llm.engine import LLMEngine
    from inferstack.llm.runner import ModelRunner, UnsupportedModelError

    hf_logging.disable_progress_bar()
    settings = engine_settings(config, instance)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("instance_group asks for KIND_GPU, but torch sees no CUDA device")
    dtype = {
        "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
        "auto": torch.float32 if device.type == "cpu" else torch.bfloat16,
    }[settings.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise ModelConfigError(f"{model_path}: cannot load the model: {type(exc).__name__}: {exc}") from None
    model.to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", 2048) or 2048
    max_model_len = settings.max_model_len or min(limit, 4096)
    if max_model_len > limit:
        raise ModelConfigError(f"parameter 'max_model_len' {max_model_len} exceeds the model's "
                               f"max_position_embeddings {limit}")
    try:
        runner = ModelRunner(model, slots=settings.max_num_seqs, max_model_len=max_model_len, device=device,
                             dtype=dtype)
    except UnsupportedModelError as exc:
        raise ModelConfigError(f"{model_path}: {exc}") from None
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    name = config.name or model_path.parent.parent.name
    log.info("model %s: %s on %s, %d slots x %d tokens (KV cache %.1f MiB)", name, model.config.model_type,
             device, settings.max_num_seqs, max_model_len, runner.cache_bytes / 2**20)
    return LLMEngine(runner, tokenizer, settings, name=name, eos_ids=eos_ids)


def sampling_from_json(engine: Any, document: dict[str, Any], prefix: str = "") -> Any:
    """SamplingParams from a JSON object (generate extension and /infer ``sampling_parameters``)."""
    from inferstack.llm.params import SamplingParams

    settings = engine.settings
    known = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "logprobs",
             "stop_token_ids", "stream", "max_new_tokens"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise InvalidArgumentError(f"{prefix}unknown sampling parameter {unknown[0]!r}; known: {sorted(known)}")
    stop = document.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    params = SamplingParams(
        max_tokens=document.get("max_tokens", document.get("max_new_tokens", settings.default_max_tokens)),
        temperature=document.get("temperature", settings.default_temperature),
        top_p=document.get("top_p", settings.default_top_p),
        top_k=document.get("top_k", settings.default_top_k),
        seed=document.get("seed"),
        stop=stop,
        stop_token_ids=document.get("stop_token_ids", []),
        ignore_eos=bool(document.get("ignore_eos", False)),
        logprobs=document.get("logprobs"),
    )
    params.validate(prefix)
    return params


class GenerationInstance(ModelInstance):
    """Holds the engine; ``execute`` serves the text-in/text-out ``/infer`` view."""

    def __init__(self, engine: Any, config: mc.ModelConfig) -> None:
        self.engine = engine
        self.config = config

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        texts = inputs.get("text_input")
        if texts is None:
            raise InvalidArgumentError(
                f"model {self.engine.name!r} is a generation model: send input 'text_input' (BYTES), or use "
                f"POST /v2/models/{self.engine.name}/generate or /v1/completions"
            )
        flat = texts.reshape(-1)
        raw_params = inputs.get("sampling_parameters")
        rows: list[tuple[list[int], Any]] = []
        for i, item in enumerate(flat):
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            document: dict[str, Any] = {}
            if raw_params is not None:
                raw = raw_params.reshape(-1)[i]
                try:
                    document = json.loads(raw)
                except ValueError as exc:
                    raise InvalidArgumentError(f"input 'sampling_parameters' is not JSON: {exc}") from None
                if not isinstance(document, dict):
                    raise InvalidArgumentError("input 'sampling_parameters' must hold a JSON object")
            rows.append((self.engine.encode(text), sampling_from_json(self.engine, document, "sampling_parameters: ")))
        # Submit every row before waiting for any: they run in the engine together.
        import queue as _queue

        boxes: list[_queue.Queue] = []
        sequences = []
        try:
            for prompt_ids, params in rows:
                box: _queue.Queue = _queue.Queue()
                sequences.append(self.engine.submit(prompt_ids, params, box.put))
                boxes.append(box)
            results = []
            for box in boxes:
                pieces = []
                while True:
                    output = box.get()
                    if output.error is not None:
                        error = output.error
                        raise error if isinstance(error, InferenceServerError) else InvalidArgumentError(str(error))
                    pieces.append(output.text)
                    if output.finish_reason is not None:
                        break
                results.append("".join(pieces).encode("utf-8"))
        finally:  # a failed row (queue full, deadline) stops the rest of the batch too
            for sequence in sequences:
                self.engine.abort(sequence)
        return {"text_output": np.array(results, dtype=np.object_).reshape(texts.shape)}

    def unload(self) -> None:
        self.engine.shutdown()


class VllmBackend(Backend):
    """``backend: "vllm"``: needs the vllm package; without it the model fails to load, saying so."""

    name = "vllm"
    default_model_filename = DEFAULT_MODEL_DIR

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        _require_vllm()
        TransformersBackend().complete_config(config, model_path, strict=strict)

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        _require_vllm()
        from inferstack.llm.vllm_engine import build_vllm_engine

        try:
            engine = build_vllm_engine(config, model_path, instance)
        except ModelConfigError:
            raise
        except Exception as exc:
            raise ModelConfigError(f"{model_path}: vLLM cannot load the model: {type(exc).__name__}: {exc}") from None
        return VllmInstance(engine)


class VllmInstance(ModelInstance):
    """A vLLM engine: served through /v1, /generate and gRPC streaming, not /infer."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        raise InvalidArgumentError(
            f"model {self.engine.name!r} runs on vLLM: use POST /v2/models/{self.engine.name}/generate, "
            "/v1/completions or gRPC ModelStreamInfer"
        )

    def unload(self) -> None:
        self.engine.shutdown()


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ModelConfigError(
            "backend 'vllm' needs the vllm package, which is not installed (pip install vllm; GPU, or "
            "vLLM's CPU build); use backend: \"transformers\" to serve the model with inferstack's own engine"
        )
