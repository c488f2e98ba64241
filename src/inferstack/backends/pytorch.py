"""PyTorch backend: TorchScript (``platform: "pytorch_libtorch"``) and ``torch.export`` programs.

Two file formats, one backend (``backend: "pytorch"``):

* ``model.pt``: a TorchScript module saved with ``torch.jit.save``, loaded with
  ``torch.jit.load``. This is what Triton's ``pytorch_libtorch`` platform serves.
* ``model.pt2``: an ``ExportedProgram`` saved with ``torch.export.save``, loaded
  with ``torch.export.load`` (the PyTorch 2 way to ship a model without Python
  source). ``backend: "pytorch"`` prefers it when the version directory holds
  one; ``default_model_filename`` picks either explicitly (by extension).

Tensors are matched to the model's ``forward`` arguments the way Triton's
PyTorch backend does: names of the form ``<anything>__<index>`` (``INPUT__0``)
are positional; other names must equal ``forward``'s argument names. Outputs
named ``<anything>__<index>`` take that element of the returned tuple; other
names take a dict's key when the model returns a dict, else the tuple element
in the order the config declares them.

torch is imported lazily, on the first load of a PyTorch model, so the server
(and ``pip install inferstack``) works without it; ``inferstack[pytorch]``
installs it. ``KIND_GPU`` instances run on ``cuda:<device_id>`` and fail the
load with a message when CUDA is not available — never a silent CPU fallback.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.backends.resources import int_parameter, usable_cores
from inferstack.core.datatypes import config_to_datatype, datatype_to_config
from inferstack.core.errors import InternalError
from inferstack.repository.config import ModelConfigError, parameter

log = logging.getLogger("inferstack.backends.pytorch")

TORCHSCRIPT_FILENAME = "model.pt"
EXPORT_FILENAME = "model.pt2"

#: Triton's positional naming convention: ``INPUT__0``, ``OUTPUT__1``.
_POSITIONAL = re.compile(r"^.+__(\d+)$")

#: v2 datatype -> torch dtype attribute name. BYTES has no tensor equivalent.
_TORCH_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}


def _torch() -> Any:
    """Import torch on first use; a clear load error when it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise ModelConfigError(
            f"the PyTorch backend needs torch, which cannot be imported ({exc}); "
            "install it with: pip install 'inferstack[pytorch]'"
        ) from None
    return torch


#: torch.export.load keeps its deserializer in a module global: two loads at once (models
#: load concurrently, each in a worker thread) fail with "_CURRENT_DESERIALIZER is already set".
_export_lock = threading.Lock()


def _export_load(torch: Any, model_path: Path) -> Any:
    with _export_lock:
        return torch.export.load(str(model_path))


def _is_export(model_path: Path) -> bool:
    return model_path.suffix == ".pt2"


def _positions(names: list[str]) -> list[int] | None:
    """Indices from ``<name>__<index>`` names when every name has one, else None."""
    matches = [_POSITIONAL.match(name) for name in names]
    if names and all(matches):
        return [int(m.group(1)) for m in matches if m]
    return None


def _load_module(model_path: Path, device: str) -> Any:
    """The callable module from either file format, on ``device``, in eval mode."""
    torch = _torch()
    if not model_path.is_file():
        raise ModelConfigError(f"model file {model_path} not found")
    try:
        if _is_export(model_path):
            program = _export_load(torch, model_path)
            if device != "cpu":
                move = getattr(getattr(torch.export, "passes", None), "move_to_device_pass", None)
                program = move(program, device) if move is not None else program
            module = program.module()
            if device != "cpu":
                module = module.to(device)
        else:
            module = torch.jit.load(str(model_path), map_location=device)
            module.eval()
    except ModelConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zipfile errors, pickle errors ...
        kind = "torch.export.load" if _is_export(model_path) else "torch.jit.load"
        raise ModelConfigError(f"{model_path}: {kind} cannot load the model: {type(exc).__name__}: {exc}") from None
    return module


def _argument_names(module: Any, model_path: Path) -> list[str]:
    """``forward``'s argument names, without ``self``."""
    if _is_export(model_path):
        import inspect

        try:
            params = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):
            return []
        return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        arguments = module.forward.schema.arguments
    except AttributeError:
        return []
    return [a.name for a in arguments][1:]


class PyTorchBackend(Backend):
    name = "pytorch"
    default_model_filename = TORCHSCRIPT_FILENAME

    def model_path(self, config: mc.ModelConfig, version_dir: Path) -> Path:
        if config.default_model_filename:
            return version_dir / config.default_model_filename
        if config.platform != "pytorch_libtorch" and (version_dir / EXPORT_FILENAME).is_file():
            return version_dir / EXPORT_FILENAME
        return version_dir / TORCHSCRIPT_FILENAME

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        if not model_path.is_file():
            raise ModelConfigError(f"model file {model_path} not found")
        for tensor in list(config.input) + list(config.output):
            datatype = config_to_datatype(mc.DataType.Name(tensor.data_type))
            if datatype not in _TORCH_DTYPES:
                raise ModelConfigError(
                    f"tensor {tensor.name!r}: {mc.DataType.Name(tensor.data_type)} is not supported by the "
                    f"PyTorch backend; supported: {', '.join(datatype_to_config(d) for d in _TORCH_DTYPES)}"
                )
        if not config.backend and not config.platform:
            config.backend = "pytorch"
        if (not config.input or not config.output) and _is_export(model_path) and not strict:
            _complete_from_program(config, model_path)
        if not config.input or not config.output:
            raise ModelConfigError(
                f"{model_path}: the PyTorch backend needs the config to declare inputs and outputs "
                "(a TorchScript file does not record datatypes and shapes)"
            )
        module = _load_module(model_path, "cpu")
        _input_positions(config, module, model_path)

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        torch = _torch()
        if instance.kind == "KIND_GPU":
            if not torch.cuda.is_available():
                raise ModelConfigError(
                    "instance_group kind KIND_GPU needs CUDA, but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
                )
            if instance.device_id >= torch.cuda.device_count():
                raise ModelConfigError(
                    f"instance {instance.name}: GPU {instance.device_id} does not exist "
                    f"({torch.cuda.device_count()} visible)"
                )
            device = f"cuda:{instance.device_id}"
        else:
            device = "cpu"
        module = _load_module(model_path, device)
        threads = int_parameter(config, "INTRA_OP_THREAD_COUNT") or max(
            1, usable_cores() // max(1, instance.total_instances)
        )
        _set_interop_threads(torch, int_parameter(config, "INTER_OP_THREAD_COUNT"))
        created = PyTorchInstance(torch, module, config, model_path, device, threads)
        # Triton's switch for TorchScript's profiling executor, which re-specialises the graph
        # for each new input shape (every new batch size, under dynamic batching).
        created.optimized = not _bool_parameter(config, "DISABLE_OPTIMIZED_EXECUTION")
        return created


def _complete_from_program(config: mc.ModelConfig, model_path: Path) -> None:
    """Fill inputs/outputs from an ExportedProgram's example metadata (names ``INPUT__i``/``OUTPUT__i``)."""
    torch = _torch()
    try:
        program = _export_load(torch, model_path)
    except Exception as exc:  # noqa: BLE001 - any load failure is a load error
        raise ModelConfigError(f"{model_path}: torch.export.load cannot load the model: {exc}") from None
    by_dtype = {getattr(torch, attr): name for name, attr in _TORCH_DTYPES.items() if hasattr(torch, attr)}
    nodes = {node.name: node for node in program.graph.nodes}
    user_inputs = list(program.graph_signature.user_inputs)
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    flat_outputs = output_node.args[0]
    user_outputs = list(flat_outputs)[-len(program.graph_signature.user_outputs):] if flat_outputs else []

    def describe(node: Any, what: str) -> tuple[str, list[int]]:
        value = node.meta.get("val") if hasattr(node, "meta") else None
        if value is None or not hasattr(value, "dtype"):
            raise ModelConfigError(f"{model_path}: {what} is not a tensor; declare inputs and outputs in the config")
        datatype = by_dtype.get(value.dtype)
        if datatype is None:
            raise ModelConfigError(f"{model_path}: {what} has dtype {value.dtype}, which has no v2 datatype")
        dims = [int(d) if isinstance(d, int) else -1 for d in value.shape]
        return datatype, dims

    inputs = [describe(nodes[name], f"input {name!r}") for name in user_inputs]
    outputs = [describe(node, f"output {i}") for i, node in enumerate(user_outputs)]
    batch = 1 if config.max_batch_size > 0 else 0
    if batch and any(not dims or dims[0] != -1 for _, dims in inputs + outputs):
        raise ModelConfigError(
            f"{model_path}: max_batch_size > 0 needs a dynamic first dimension on every tensor "
            "(export with torch.export.Dim for dimension 0)"
        )
    for target, found, prefix in ((config.input, inputs, "INPUT"), (config.output, outputs, "OUTPUT")):
        if target:
            continue
        for index, (datatype, dims) in enumerate(found):
            tensor = target.add()
            tensor.name = f"{prefix}__{index}"
            tensor.data_type = mc.DataType.Value(datatype_to_config(datatype))
            tensor.dims.extend(dims[batch:] or [1])


def _input_positions(config: mc.ModelConfig, module: Any, model_path: Path) -> list[int]:
    """The ``forward`` argument index of each config input, in config order."""
    names = [tensor.name for tensor in config.input]
    positions = _positions(names)
    arguments = _argument_names(module, model_path)
    if positions is None:
        missing = [name for name in names if name not in arguments]
        if missing:
            raise ModelConfigError(
                f"{model_path}: inputs {missing} match no argument of the model's forward{tuple(arguments)}; "
                "name inputs after the arguments, or use Triton's INPUT__<index> convention"
            )
        positions = [arguments.index(name) for name in names]
    if sorted(positions) != list(range(len(positions))):
        raise ModelConfigError(
            f"{model_path}: input positions {sorted(positions)} must be 0..{len(positions) - 1} without gaps"
        )
    if arguments and len(arguments) < len(positions):
        raise ModelConfigError(
            f"{model_path}: the config declares {len(positions)} inputs but forward takes {len(arguments)} "
            f"arguments {tuple(arguments)}"
        )
    return positions


def _bool_parameter(config: mc.ModelConfig, key: str) -> bool:
    value = (parameter(config, key) or "").strip().lower()
    if value in ("", "false", "0", "no", "off"):
        return False
    if value in ("true", "1", "yes", "on"):
        return True
    raise ModelConfigError(f"parameter {key!r} must be true or false, got {value!r}")


_interop_lock = threading.Lock()


def _set_interop_threads(torch: Any, count: int) -> None:
    """Inter-op threads are process-wide and settable only before torch's first parallel work."""
    if not count:
        return
    with _interop_lock:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError as exc:
            log.warning("INTER_OP_THREAD_COUNT %d not applied: %s", count, exc)


class PyTorchInstance(ModelInstance):
    def __init__(self, torch: Any, module: Any, config: mc.ModelConfig, model_path: Path, device: str,
                 threads: int) -> None:
        self._torch = torch
        self._module = module
        self._device = device
        self._threads = threads
        self._threads_set = False
        self._script = not _is_export(model_path)
        #: TorchScript's optimized (profiling) execution; see DISABLE_OPTIMIZED_EXECUTION.
        self.optimized = True
        self._input_positions = dict(zip((t.name for t in config.input), _input_positions(config, module,
                                                                                            model_path)))
        self._arity = len(self._input_positions)
        self._output_names = [t.name for t in config.output]
        positions = _positions(self._output_names)
        self._output_positions = dict(zip(self._output_names, positions or range(len(self._output_names))))
        self._by_position = positions is not None
        self._output_dtypes = {
            t.name: getattr(torch, _TORCH_DTYPES[config_to_datatype(mc.DataType.Name(t.data_type))])
            for t in config.output
        }

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        if not self._threads_set:
            # torch's intra-op setting applies to the calling thread's OpenMP pool:
            # set it on the instance thread itself, once.
            torch.set_num_threads(self._threads)
            self._threads_set = True
        args: list[Any] = [None] * self._arity
        for name, array in inputs.items():
            if not (array.flags.writeable and array.flags.c_contiguous):
                array = np.array(array)  # torch needs writable memory; request bodies are read-only views
            tensor = torch.from_numpy(array)
            if self._device != "cpu":
                tensor = tensor.to(self._device, non_blocking=True)
            args[self._input_positions[name]] = tensor
        missing = [name for name, pos in self._input_positions.items() if args[pos] is None]
        if missing:  # optional inputs not sent: forward receives None
            log.debug("inputs %s not given; passing None", missing)
        try:
            with torch.inference_mode():
                if self._script:
                    with torch.jit.optimized_execution(self.optimized):
                        result = self._module(*args)
                else:
                    result = self._module(*args)
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported as 500
            raise InternalError(f"PyTorch model failed: {type(exc).__name__}: {_first_line(exc)}") from None
        return self._outputs(result, outputs)

    def _outputs(self, result: Any, wanted: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            if isinstance(result, dict) and not self._by_position:
                if name not in result:
                    raise InternalError(f"the model returned a dict without key {name!r}; keys: {sorted(result)}")
                value = result[name]
            elif isinstance(result, (tuple, list)):
                position = self._output_positions[name]
                if position >= len(result):
                    raise InternalError(
                        f"output {name!r} is element {position} of the model's result, which has {len(result)}"
                    )
                value = result[position]
            else:
                if self._output_positions[name] != 0:
                    raise InternalError(f"output {name!r} is element {self._output_positions[name]}, but the "
                                        "model returned a single tensor")
                value = result
            if not isinstance(value, torch.Tensor):
                raise InternalError(f"output {name!r} is a {type(value).__name__}, not a tensor")
            if value.dtype != self._output_dtypes[name]:
                raise InternalError(
                    f"output {name!r} has dtype {value.dtype}, the config declares {self._output_dtypes[name]}"
                )
            out[name] = value.detach().cpu().numpy()
        return out

    def unload(self) -> None:
        self._module = None
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _first_line(exc: Exception) -> str:
    """The useful line of a torch error (TorchScript puts the cause last, after its traceback)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "TorchScript interpreter" in lines[0]:
        return lines[-1]
    return lines[0]

