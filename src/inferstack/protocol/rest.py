"""KServe v2 REST inference bodies, with Triton's binary tensor data extension.

A request body is JSON, optionally followed by raw tensor bytes; the header
``Inference-Header-Content-Length`` then says where the JSON ends. Inputs
with ``parameters.binary_data_size`` take their data from that binary part,
in order, decoded with ``np.frombuffer`` (no copy, no per-element loop).
Outputs are returned as JSON ``data`` or, when the client asks with
``binary_data`` (per output) or ``binary_data_output`` (per request), as raw
bytes after the JSON. Inputs and outputs with ``shared_memory_region``
parameters are read from / written to a registered system shared memory
region instead (``protocol/shared_memory.py``).

Every way a body can be wrong raises InvalidArgumentError naming the field,
input and reason; nothing here lets a malformed body reach the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inferstack.core.datatypes import DATATYPES, datatype_of, numpy_dtype
from inferstack.core.errors import InvalidArgumentError, UnsupportedError
from inferstack.core.types import InferenceRequest, InferenceResponse, RequestedOutput
from inferstack.protocol.shared_memory import SharedMemoryLease, SharedMemoryRef, shared_memory_reference
from inferstack.protocol.tensors import check_shape, is_int, tensor_from_bytes, tensor_to_bytes

HEADER_LENGTH = "inference-header-content-length"


_INT_KINDS = "iu"


@dataclass(slots=True)
class OutputFormat:
    """How the client wants outputs encoded: which ones go binary, which to shared memory."""

    binary_default: bool = False
    binary: dict[str, bool] | None = None
    #: Outputs the client wants written to a shared memory region instead of the body.
    shared_memory: dict[str, SharedMemoryRef] | None = None

    def is_binary(self, name: str) -> bool:
        if self.binary is not None and name in self.binary:
            return self.binary[name]
        return self.binary_default


def _fail(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{where}: 'parameters' must be a JSON object")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _fail(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return check_shape(value, name)


def decode_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str = "",
    shared_memory: SharedMemoryLease | None = None,
) -> tuple[InferenceRequest, OutputFormat]:
    """Decode an infer request body into an InferenceRequest and the output format.

    Inputs and outputs naming a ``shared_memory_region`` need ``shared_memory``
    (the request's lease on the server's regions); without one they are refused.
    """
    if header_length is None:
        json_part: bytes | memoryview = body
        binary = memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise _fail(
                f"Inference-Header-Content-Length {header_length} is outside the body "
                f"of {len(body)} bytes"
            )
        view = memoryview(body)
        json_part, binary = view[:header_length], view[header_length:]
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(document, dict):
        raise _fail("the request body must be a JSON object")

    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise _fail("'id' must be a string")
    parameters = _parameters(document.get("parameters"), "request")
    for key in ("priority", "timeout"):
        if key in parameters and (not is_int(parameters[key]) or parameters[key] < 0):
            raise _fail(f"request parameter {key!r} must be a non-negative integer")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _fail("request parameter 'binary_data_output' must be a boolean")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise _fail(f"inputs[{position}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"inputs[{position}]: 'name' must be a non-empty string")
        if name in inputs:
            raise _fail(f"input {name!r} appears more than once")
        shape = _shape(item.get("shape"), name)
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise _fail(
                f"input {name!r}: unsupported datatype {datatype!r}; expected one of "
                f"{', '.join(sorted(DATATYPES))}"
            )
        input_parameters = _parameters(item.get("parameters"), f"input {name!r}")
        ref = shared_memory_reference(input_parameters, f"input {name!r}")
        size = input_parameters.get("binary_data_size")
        if ref is not None:
            if shared_memory is None:
                raise UnsupportedError(f"input {name!r}: shared memory inputs are not supported here")
            if "data" in item or size is not None:
                raise _fail(
                    f"input {name!r} has 'shared_memory_region' and also "
                    f"{'data' if 'data' in item else 'binary_data_size'}; give one source"
                )
            inputs[name] = shared_memory.read_input(
                ref.region, ref.offset, ref.byte_size, datatype, shape, tensor=name
            )
        elif size is not None:
            if not is_int(size) or size < 0:
                raise _fail(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
            if "data" in item:
                raise _fail(f"input {name!r} has both 'data' and 'binary_data_size'")
            if offset + size > len(binary):
                raise _fail(
                    f"input {name!r}: binary_data_size {size} exceeds the "
                    f"{len(binary) - offset} bytes of binary data left in the body"
                )
            inputs[name] = _from_binary(binary[offset : offset + size], shape, datatype, name)
            offset += size
        else:
            if "data" not in item:
                raise _fail(f"input {name!r} has neither 'data' nor 'binary_data_size'")
            inputs[name] = _from_json(item["data"], shape, datatype, name)
    if offset != len(binary):
        raise _fail(f"{len(binary) - offset} bytes of binary data in the body belong to no input")

    outputs, binary_by_name, shm_outputs = _requested_outputs(document.get("outputs"))
    if shm_outputs:
        if shared_memory is None:
            raise UnsupportedError(
                f"output {next(iter(shm_outputs))!r}: shared memory outputs are not supported here"
            )
        for name, ref in shm_outputs.items():  # unknown region / bounds: 4xx before the model runs
            shared_memory.check_output(ref.region, ref.offset, ref.byte_size, tensor=name)
    request = InferenceRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )
    return request, OutputFormat(binary_default, binary_by_name, shm_outputs or None)


def _requested_outputs(
    value: Any,
) -> tuple[list[RequestedOutput] | None, dict[str, bool] | None, dict[str, SharedMemoryRef]]:
    if value is None:
        return None, None, {}
    if not isinstance(value, list):
        raise _fail("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    binary: dict[str, bool] = {}
    shm: dict[str, SharedMemoryRef] = {}
    for position, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(f"outputs[{position}] must be an object with a string 'name'")
        name = item["name"]
        parameters = _parameters(item.get("parameters"), f"output {name!r}")
        ref = shared_memory_reference(parameters, f"output {name!r}")
        if ref is not None:
            shm[name] = ref
        if parameters.get("classification"):
            raise UnsupportedError(f"output {name!r}: the classification extension is not supported yet")
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise _fail(f"output {name!r}: 'binary_data' must be a boolean")
            binary[name] = parameters["binary_data"]
        outputs.append(RequestedOutput(name, parameters))
    # An empty list, like none, asks for every output (as Triton does).
    return outputs or None, binary, shm


def _from_binary(buffer: memoryview, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    return tensor_from_bytes(buffer, shape, datatype, name, source="binary_data_size")


def _from_json(data: Any, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    count = 1
    for dim in shape:
        count *= dim
    if not isinstance(data, list):
        data = [data]
    try:
        probe = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail(f"input {name!r}: 'data' is not a regular array: {exc}") from None
    if probe.size != count:
        raise _fail(
            f"input {name!r}: shape {list(shape)} needs {count} elements, 'data' has {probe.size}"
        )
    kind = probe.dtype.kind
    if count == 0:
        return np.empty(shape, dtype=numpy_dtype(datatype))
    if datatype == "BYTES":
        if kind not in "U":
            raise _fail(f"input {name!r}: BYTES 'data' must hold strings")
        flat = [item.encode("utf-8") for item in probe.reshape(-1).tolist()]
        array = np.empty(count, dtype=np.object_)
        array[:] = flat
        return array.reshape(shape)
    dtype = numpy_dtype(datatype)
    if datatype == "BOOL":
        if kind != "b":
            raise _fail(f"input {name!r}: BOOL 'data' must hold true/false values")
        return probe.reshape(shape)
    if dtype.kind in _INT_KINDS:
        if kind == "f":
            # numpy turns a mix of integers below and above 2**63 into float64;
            # such data (UINT64 near its top) is still exact integers.
            exact = _exact_integers(data, count)
            if exact is not None:
                if min(exact) < np.iinfo(dtype).min or max(exact) > np.iinfo(dtype).max:
                    raise _fail(f"input {name!r}: a value in 'data' is outside the range of {datatype}")
                return np.array(exact, dtype=dtype).reshape(shape)
        if kind not in _INT_KINDS:
            raise _fail(f"input {name!r}: {datatype} 'data' must hold integers, found {_kind_name(kind)}")
        info = np.iinfo(dtype)
        if probe.min() < info.min or probe.max() > info.max:
            raise _fail(f"input {name!r}: a value in 'data' is outside the range of {datatype}")
    elif kind not in "iuf":
        raise _fail(f"input {name!r}: {datatype} 'data' must hold numbers, found {_kind_name(kind)}")
    return probe.astype(dtype, copy=False).reshape(shape)


def _exact_integers(data: list[Any], count: int) -> list[int] | None:
    """The flattened values of regular nested ``data`` if every one is an integer, else None."""
    flat = np.asarray(data, dtype=np.object_).reshape(-1).tolist()
    if len(flat) != count or not all(is_int(value) for value in flat):
        return None
    return flat


def _kind_name(kind: str) -> str:
    return {"b": "booleans", "f": "floats", "U": "strings", "O": "mixed values"}.get(kind, "other values")


def encode_response(
    response: InferenceResponse,
    output_format: OutputFormat,
    shared_memory: SharedMemoryLease | None = None,
) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and the JSON length when binary data follows.

    Outputs the client asked to receive in shared memory are copied there
    (through ``shared_memory``, the lease ``decode_request`` used) and carry
    the request's shared memory parameters instead of data, as in Triton.
    """
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    shm_outputs = output_format.shared_memory or {}
    for name, array in response.outputs.items():
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        ref = shm_outputs.get(name)
        if ref is not None:
            if shared_memory is None:
                raise UnsupportedError(f"output {name!r}: shared memory outputs are not supported here")
            shared_memory.write_output(ref.region, ref.offset, ref.byte_size, array, datatype, tensor=name)
            entry["parameters"] = ref.parameters()
        elif output_format.is_binary(name):
            raw = tensor_to_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_as_text(item) for item in array.reshape(-1).tolist()]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


def _as_text(item: Any) -> str:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item).decode("utf-8", "replace")
    return str(item)
