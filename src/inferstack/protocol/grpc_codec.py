"""KServe v2 gRPC messages (``inference.ModelInferRequest`` ...) <-> core types.

Inputs arrive either as ``raw_input_contents`` (one bytes entry per input, in
order — what tritonclient sends) decoded with ``np.frombuffer``, or as typed
``contents`` (``fp32_contents`` ...) converted in one numpy call each.
Responses always carry ``raw_output_contents``, one entry per output in
order, as Triton's do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.core.datatypes import DATATYPES, datatype_of, numpy_dtype
from inferstack.core.errors import InvalidArgumentError, UnsupportedError
from inferstack.core.types import InferenceRequest, InferenceResponse, RequestedOutput
from inferstack.protocol.tensors import check_shape, element_count, tensor_from_bytes, tensor_to_bytes

# Which typed ``InferTensorContents`` field carries each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


_WIDE = {"f": np.float64, "u": np.uint64, "i": np.int64, "b": np.bool_}


def parameter_value(parameter: Any) -> Any:
    """The Python value of an ``InferParameter`` / ``ModelRepositoryParameter`` oneof."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def parameters_to_dict(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def _set_parameter(target: Any, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value > 2**63 - 1:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def decode_infer_request(message: pb.ModelInferRequest) -> InferenceRequest:
    """Decode a ModelInferRequest; every malformed field raises InvalidArgumentError."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "give every input raw contents or none"
        )
    if not message.inputs:
        raise InvalidArgumentError("the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise InvalidArgumentError(f"inputs[{index}] has no name")
        if name in inputs:
            raise InvalidArgumentError(f"input {name!r} appears more than once")
        if tensor.datatype not in DATATYPES:
            raise InvalidArgumentError(
                f"input {name!r}: unsupported datatype {tensor.datatype!r}; expected one of "
                f"{', '.join(sorted(DATATYPES))}"
            )
        shape = check_shape(list(tensor.shape), name)
        if "shared_memory_region" in tensor.parameters:
            raise UnsupportedError(f"input {name!r}: shared memory inputs are not supported over gRPC yet")
        if raw:
            inputs[name] = tensor_from_bytes(
                raw[index], shape, tensor.datatype, name, source=f"raw_input_contents[{index}] size"
            )
        elif tensor.HasField("contents"):
            inputs[name] = _from_contents(tensor.contents, shape, tensor.datatype, name)
        else:
            raise InvalidArgumentError(f"input {name!r} has neither raw_input_contents nor contents")
    outputs = None
    if message.outputs:
        outputs = []
        for requested in message.outputs:
            params = parameters_to_dict(requested.parameters)
            if "shared_memory_region" in params:
                raise UnsupportedError(
                    f"output {requested.name!r}: shared memory outputs are not supported over gRPC yet"
                )
            if params.get("classification"):
                raise UnsupportedError(
                    f"output {requested.name!r}: the classification extension is not supported yet"
                )
            outputs.append(RequestedOutput(requested.name, params))
    parameters = parameters_to_dict(message.parameters)
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidArgumentError(f"request parameter {key!r} must be a non-negative integer")
    return InferenceRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )


def _from_contents(contents: Any, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgumentError(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input {name!r}: shape {list(shape)} needs {count} elements, contents.{field} has {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = numpy_dtype(datatype)
    # Convert at the field's own width first, then range-check the narrowing.
    wide = np.array(values, dtype=_WIDE[dtype.kind])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgumentError(f"input {name!r}: a value in contents.{field} is outside the range of {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


def encode_infer_response(response: InferenceResponse) -> pb.ModelInferResponse:
    """Encode outputs as raw_output_contents (one entry per output, in order)."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
    )
    for key, value in response.parameters.items():
        _set_parameter(message.parameters[key], value)
    raw = message.raw_output_contents
    for name, array in response.outputs.items():
        datatype = datatype_of(array)
        message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raw.append(tensor_to_bytes(array, datatype))
    return message
