"""``triton_python_backend_utils`` for inferstack: the API Triton Python models import.

A model written for Triton's Python backend does
``import triton_python_backend_utils as pb_utils`` and uses the classes and
helpers below; they behave as Triton documents them, so the model runs
unchanged. Tensors are numpy arrays living in the worker (CPU); what Triton
offers and inferstack does not (decoupled response senders, custom metrics,
GPU tensors) raises :class:`TritonModelException` saying so — see
docs/python_backend.md.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import numpy as np

from inferstack.python_backend.ipc import deserialize_bytes, serialize_bytes

__all__ = [
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "InferenceRequest",
    "InferenceResponse",
    "Logger",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "deserialize_bytes_tensor",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_model_dir",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
]

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

#: Set by the worker: the connection BLS requests travel over, and the model's directory.
_bls: Any = None
_model_dir: str = ""


class TritonModelException(Exception):
    """Raised by the utilities (and by models) when something cannot be done."""


class TritonError:
    """An error attached to a response; ``code`` as in Triton."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = 1) -> None:  # Triton's default: INTERNAL
        self._message = str(message)
        self._code = int(code)

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named tensor backed by a numpy array (CPU)."""

    __slots__ = ("_array", "_name")

    def __init__(self, name: str, array: Any) -> None:
        if type(array) is np.ndarray and array.dtype.kind not in "SU" and type(name) is str:  # the common case
            self._name = name
            self._array = array
            return
        if not isinstance(name, str):
            raise TritonModelException(f"Tensor name must be a str, got {type(name).__name__}")
        array = np.asarray(array)
        if array.dtype.kind in "U":
            array = np.vectorize(lambda s: s.encode("utf-8"), otypes=[np.object_])(array) if array.size else \
                array.astype(np.object_)
        elif array.dtype.kind == "S":
            array = array.astype(np.object_)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def triton_dtype(self) -> str:
        return numpy_to_triton_type(self._array.dtype) or "TYPE_STRING"

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """From any object with ``__dlpack__`` (a torch tensor, a cupy array ...); copied to the CPU."""
        if hasattr(capsule, "__dlpack__"):
            try:
                return Tensor(name, np.from_dlpack(capsule))
            except (RuntimeError, BufferError, TypeError):
                if hasattr(capsule, "cpu"):
                    return Tensor(name, np.asarray(capsule.detach().cpu()))
                raise
        raise TritonModelException("from_dlpack needs an object with __dlpack__ (raw capsules are not supported)")

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self.shape()}, dtype={self._array.dtype})"


class InferenceResponse:
    """A model's answer to one request: output tensors, or an error."""

    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | str | None = None,
                 parameters: dict | str | None = None) -> None:
        if isinstance(error, str):
            error = TritonError(error)
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return self._parameters


class InferenceRequest:
    """A request the model received, or one it builds to call another model (BLS)."""

    # Positional order as in Triton's pybind definition; everyone passes keywords anyway.
    def __init__(
        self,
        request_id: str = "",
        correlation_id: int | str = 0,
        inputs: list[Tensor] | None = None,
        requested_output_names: list[str] | None = None,
        model_name: str = "",
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        parameters: dict | str | None = None,
        preferred_memory: Any = None,
        trace: Any = None,
    ) -> None:
        self._model_name = model_name
        self._outputs = list(requested_output_names or [])
        self._inputs = list(inputs or [])
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._parameters: dict[str, Any] = dict(parameters or {})

    # -- what a received request offers --------------------------------------------

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON string (Triton's convention)."""
        return json.dumps(self._parameters)

    def is_cancelled(self) -> bool:
        return False

    def get_response_sender(self) -> Any:
        raise TritonModelException(
            "decoupled models (response senders) are not supported by inferstack's Python backend"
        )

    # -- BLS -----------------------------------------------------------------------

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        """Run this request on ``model_name`` through the server (its batcher included)."""
        if decoupled:
            raise TritonModelException("decoupled BLS calls are not supported by inferstack")
        if _bls is None:
            raise TritonModelException("InferenceRequest.exec() is only available inside the server's worker")
        if not self._model_name:
            raise TritonModelException("InferenceRequest.exec() needs model_name")
        parameters = dict(self._parameters)
        if self._timeout:
            parameters.setdefault("timeout", int(self._timeout))
        outputs, error = _bls.infer(
            self._model_name,
            "" if self._model_version in (-1, None, "") else str(self._model_version),
            [(t.name(), t.as_numpy()) for t in self._inputs],
            self._outputs or None,
            self._request_id,
            parameters,
        )
        if error is not None:
            return InferenceResponse(error=TritonError(error[1], _CODES.get(error[0], TritonError.INTERNAL)))
        return InferenceResponse([Tensor(name, array) for name, array in outputs])

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse:
        """Like ``exec`` (the call blocks the worker while the server runs it)."""
        return self.exec(decoupled)


#: Error class names as the server sends them -> TritonError codes.
_CODES = {
    "INVALID_ARGUMENT": TritonError.INVALID_ARG, "NOT_FOUND": TritonError.NOT_FOUND,
    "UNAVAILABLE": TritonError.UNAVAILABLE, "UNIMPLEMENTED": TritonError.UNSUPPORTED,
    "ALREADY_EXISTS": TritonError.ALREADY_EXISTS, "CANCELLED": TritonError.CANCELLED,
    "INTERNAL": TritonError.INTERNAL,
}


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for entry in model_config.get("input", []):
        if entry.get("name") == name:
            return entry
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for entry in model_config.get("output", []):
        if entry.get("name") == name:
            return entry
    return None


def get_model_dir() -> str:
    """The model's directory in the repository (``REPO/<model>``)."""
    return _model_dir


_TRITON_TO_NUMPY = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_, "TYPE_BF16": np.float32,
}
_NUMPY_TO_TRITON = {np.dtype(v): k for k, v in _TRITON_TO_NUMPY.items() if k != "TYPE_BF16"}
# Triton's numeric type enum (triton_to_numpy_type takes these).
_TRITON_ENUM = {1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64, 6: np.int8, 7: np.int16,
                8: np.int32, 9: np.int64, 10: np.float16, 11: np.float32, 12: np.float64, 13: np.object_}


def triton_string_to_numpy(triton_type_string: str) -> type:
    try:
        return _TRITON_TO_NUMPY[triton_type_string]
    except KeyError:
        raise TritonModelException(f"unknown Triton type {triton_type_string!r}") from None


def numpy_to_triton_type(data_type: Any) -> str | None:
    dtype = np.dtype(data_type)
    if dtype.kind in "SUO":
        return "TYPE_STRING"
    return _NUMPY_TO_TRITON.get(dtype)


def triton_to_numpy_type(data_type: int) -> type | None:
    return _TRITON_ENUM.get(data_type)


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    if input_tensor.size == 0:
        return None
    return np.frombuffer(serialize_bytes(np.asarray(input_tensor, dtype=np.object_)), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: Any) -> np.ndarray:
    data = bytes(np.asarray(encoded_tensor, dtype=np.uint8).tobytes()) if not isinstance(encoded_tensor, bytes) \
        else encoded_tensor
    return deserialize_bytes(data, (-1,)).reshape(-1)


class Logger:
    """``pb_utils.Logger.log_info(...)``: lines in the server's log (worker stderr)."""

    _log = logging.getLogger("inferstack.python_model")

    @classmethod
    def log(cls, message: str, level: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)

    @classmethod
    def log_info(cls, message: str) -> None:
        print(f"I python model: {message}", file=sys.stderr, flush=True)

    @classmethod
    def log_warn(cls, message: str) -> None:
        print(f"W python model: {message}", file=sys.stderr, flush=True)

    @classmethod
    def log_error(cls, message: str) -> None:
        print(f"E python model: {message}", file=sys.stderr, flush=True)

    @classmethod
    def log_verbose(cls, message: str) -> None:
        print(f"V python model: {message}", file=sys.stderr, flush=True)
