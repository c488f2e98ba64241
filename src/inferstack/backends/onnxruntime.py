"""ONNX Runtime backend (``platform: "onnxruntime_onnx"`` / ``backend: "onnxruntime"``).

Each instance owns an ``InferenceSession``. ONNX Runtime releases the GIL
while it runs, so instances executing on their own threads really run in
parallel. Thread counts come from the config's ``parameters`` using the
names of Triton's ONNX Runtime backend (``intra_op_thread_count``,
``inter_op_thread_count``); by default the machine's cores are divided
between the model's instances so that N instances do not oversubscribe them.

GPU: ``instance_group { kind: KIND_GPU gpus: [0] }`` selects the CUDA
execution provider (and TensorRT when the config names the ``tensorrt``
accelerator); this needs the ``onnxruntime-gpu`` wheel (``inferstack[gpu]``).
A GPU instance requested where no CUDA provider exists fails the load with a
message saying so rather than quietly running on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.backends.resources import int_parameter, usable_cores
from inferstack.core.datatypes import datatype_to_config
from inferstack.core.errors import InternalError, InvalidArgumentError
from inferstack.repository.config import ModelConfigError

log = logging.getLogger("inferstack.backends.onnxruntime")

# ONNX Runtime's type strings -> v2 datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _dims(shape: list[Any]) -> list[int]:
    """ORT shapes hold ints, symbolic names or None; anything not an int is -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    default_model_filename = "model.onnx"

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        if not model_path.is_file():
            raise ModelConfigError(f"model file {model_path} not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise ModelConfigError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from None
        inputs = [(i.name, _ORT_TYPES.get(i.type), _dims(i.shape)) for i in session.get_inputs()]
        outputs = [(o.name, _ORT_TYPES.get(o.type), _dims(o.shape)) for o in session.get_outputs()]
        del session
        for name, datatype, _ in inputs + outputs:
            if datatype is None:
                raise ModelConfigError(f"{model_path}: tensor {name!r} has a non-tensor type")

        if not config.backend and not config.platform:
            config.platform = "onnxruntime_onnx"
        if not strict and config.max_batch_size == 0 and not config.input and not config.output:
            # Triton's default: a model whose every tensor has a dynamic first
            # dimension can batch, up to the backend's default_max_batch_size.
            batchable = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
            if batchable:
                config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
                if not config.HasField("dynamic_batching"):
                    config.dynamic_batching.SetInParent()
        batch = 1 if config.max_batch_size > 0 else 0

        _complete_tensors(config.input, inputs, batch, "input", model_path, strict)
        _complete_tensors(config.output, outputs, batch, "output", model_path, strict)

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        options = ort.SessionOptions()
        intra = int_parameter(config, "intra_op_thread_count")
        inter = int_parameter(config, "inter_op_thread_count")
        cores = usable_cores()
        options.intra_op_num_threads = intra if intra else max(1, cores // max(1, instance.total_instances))
        if inter:
            options.inter_op_num_threads = inter
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        level = config.optimization.graph.level if config.HasField("optimization") else 0
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == -1 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        providers = _providers(config, instance)
        try:
            session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:
            raise ModelConfigError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from None
        return OnnxRuntimeInstance(session, config)


#: Triton's ONNX Runtime backend default for auto-completed batching models.
DEFAULT_MAX_BATCH_SIZE = 4


def _complete_tensors(
    declared: Any,
    found: list[tuple[str, str, list[int]]],
    batch: int,
    what: str,
    model_path: Path,
    strict: bool,
) -> None:
    by_name = {name: (datatype, dims) for name, datatype, dims in found}
    if not declared:
        if strict:
            raise ModelConfigError(f"{model_path}: the config declares no {what}s")
        for name, datatype, dims in found:
            tensor = declared.add()
            tensor.name = name
            tensor.data_type = mc.DataType.Value(datatype_to_config(datatype))
            tensor.dims.extend(dims[batch:] or ([1] if batch == 0 else []))
        return
    for tensor in declared:
        if tensor.name not in by_name:
            raise ModelConfigError(
                f"{what} {tensor.name!r} is not in the model; the model's {what}s are "
                f"{sorted(by_name)}"
            )
        datatype, dims = by_name[tensor.name]
        expected = mc.DataType.Value(datatype_to_config(datatype))
        if tensor.data_type != expected:
            raise ModelConfigError(
                f"{what} {tensor.name!r}: config says {mc.DataType.Name(tensor.data_type)}, "
                f"the model has {mc.DataType.Name(expected)}"
            )
        if batch and dims and dims[0] != -1:
            raise ModelConfigError(
                f"{what} {tensor.name!r}: max_batch_size > 0 needs a dynamic first dimension, "
                f"the model's shape is {dims}"
            )
        model_dims = dims[batch:]
        config_dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        if model_dims and len(config_dims) != len(model_dims) and not tensor.HasField("reshape"):
            raise ModelConfigError(
                f"{what} {tensor.name!r}: config dims {list(tensor.dims)} do not match the "
                f"model's {'non-batch ' if batch else ''}shape {model_dims}"
            )
        if model_dims and len(config_dims) == len(model_dims):
            for c, m in zip(config_dims, model_dims):
                if m != -1 and c != -1 and c != m:
                    raise ModelConfigError(
                        f"{what} {tensor.name!r}: config dims {config_dims} do not match the "
                        f"model's {'non-batch ' if batch else ''}shape {model_dims}"
                    )
    if what == "input":
        # Outputs may be a subset; every model input must be declared, or
        # requests could never supply it.
        undeclared = sorted(set(by_name) - {tensor.name for tensor in declared})
        if undeclared:
            raise ModelConfigError(
                f"the model's inputs {undeclared} are not declared in the config"
            )


def _providers(config: mc.ModelConfig, instance: InstanceSpec) -> list[Any]:
    if instance.kind != "KIND_GPU":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ModelConfigError(
            "instance_group kind KIND_GPU needs the CUDA execution provider; this "
            f"onnxruntime offers {available} (install inferstack[gpu])"
        )
    providers: list[Any] = []
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if any(a.name == "tensorrt" for a in accelerators):
        if "TensorrtExecutionProvider" not in available:
            raise ModelConfigError("the tensorrt accelerator needs ONNX Runtime's TensorRT provider")
        providers.append(("TensorrtExecutionProvider", {"device_id": instance.device_id}))
    providers.append(("CUDAExecutionProvider", {"device_id": instance.device_id}))
    providers.append("CPUExecutionProvider")
    return providers


class OnnxRuntimeInstance(ModelInstance):
    def __init__(self, session: ort.InferenceSession, config: mc.ModelConfig) -> None:
        self._session = session
        self._string_inputs = {i.name for i in session.get_inputs() if i.type == "tensor(string)"}
        self._string_outputs = {o.name for o in session.get_outputs() if o.type == "tensor(string)"}

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feed = inputs
        if self._string_inputs:
            feed = dict(inputs)
            for name in self._string_inputs & feed.keys():
                # ORT string tensors hold UTF-8 text (its Python API takes str);
                # the protocol carries bytes. Refuse what cannot be text rather
                # than silently replacing bytes.
                try:
                    feed[name] = np.vectorize(_to_str, otypes=[object])(feed[name])
                except UnicodeDecodeError as exc:
                    raise InvalidArgumentError(
                        f"input {name!r}: element is not valid UTF-8 ({exc.reason} at byte "
                        f"{exc.start}); ONNX Runtime string tensors hold UTF-8 text"
                    ) from None
        try:
            results = self._session.run(outputs, feed)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as exc:
            raise InvalidArgumentError(f"ONNX Runtime rejected the inputs: {exc}") from None
        except Exception as exc:
            raise InternalError(f"ONNX Runtime failed: {exc}") from None
        out = dict(zip(outputs, results))
        for name in self._string_outputs & out.keys():
            out[name] = np.vectorize(_to_bytes, otypes=[object])(out[name])
        return out

    def unload(self) -> None:
        self._session = None  # type: ignore[assignment]


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _to_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)
