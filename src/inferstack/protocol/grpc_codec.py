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
from inferstack.protocol.shared_memory import SharedMemoryLease, SharedMemoryRef, shared_memory_reference
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


def decode_infer_request(
    message: pb.ModelInferRequest, shared_memory: SharedMemoryLease | None = None
) -> tuple[InferenceRequest, dict[str, SharedMemoryRef]]:
    """Decode a ModelInferRequest; every malformed field raises InvalidArgumentError.

    Returns the request and the outputs to be written to shared memory.
    Inputs in shared memory are read through ``shared_memory`` (the request's
    lease); they have no ``raw_input_contents`` entry, as tritonclient sends.
    """
    if not message.inputs:
        raise InvalidArgumentError("the request has no inputs")
    input_refs = [
        shared_memory_reference(parameters_to_dict(t.parameters), f"input {t.name!r}") for t in message.inputs
    ]
    raw = message.raw_input_contents
    with_raw = sum(1 for ref in input_refs if ref is None)
    if raw and len(raw) != with_raw:
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {with_raw} inputs not in shared memory; "
            "give every such input raw contents or none"
        )
    raw_index = 0
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
        ref = input_refs[index]
        if ref is not None:
            if shared_memory is None:
                raise UnsupportedError(f"input {name!r}: shared memory inputs are not supported here")
            inputs[name] = shared_memory.read_input(
                ref.region, ref.offset, ref.byte_size, tensor.datatype, shape, tensor=name
            )
        elif raw:
            inputs[name] = tensor_from_bytes(
                raw[raw_index], shape, tensor.datatype, name, source=f"raw_input_contents[{raw_index}] size"
            )
            raw_index += 1
        elif tensor.HasField("contents"):
            inputs[name] = _from_contents(tensor.contents, shape, tensor.datatype, name)
        else:
            raise InvalidArgumentError(f"input {name!r} has neither raw_input_contents nor contents")
    outputs = None
    shm_outputs: dict[str, SharedMemoryRef] = {}
    if message.outputs:
        outputs = []
        for requested in message.outputs:
            params = parameters_to_dict(requested.parameters)
            ref = shared_memory_reference(params, f"output {requested.name!r}")
            if ref is not None:
                if shared_memory is None:
                    raise UnsupportedError(f"output {requested.name!r}: shared memory outputs are not supported here")
                # Unknown region or bounds: a 4xx before the model runs.
                shared_memory.check_output(ref.region, ref.offset, ref.byte_size, tensor=requested.name)
                shm_outputs[requested.name] = ref
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
    request = InferenceRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )
    return request, shm_outputs


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


def encode_infer_response(
    response: InferenceResponse,
    shm_outputs: dict[str, SharedMemoryRef] | None = None,
    shared_memory: SharedMemoryLease | None = None,
) -> pb.ModelInferResponse:
    """Encode outputs as raw_output_contents (one entry per output, in order).

    An output requested in shared memory is written there; its response entry
    carries the shared memory parameters and an empty raw entry, which keeps
    the raw entries aligned with the outputs as clients index them.
    """
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
        output = message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        ref = shm_outputs.get(name) if shm_outputs else None
        if ref is not None and shared_memory is not None:
            shared_memory.write_output(ref.region, ref.offset, ref.byte_size, array, datatype, tensor=name)
            for key, value in ref.parameters().items():
                _set_parameter(output.parameters[key], value)
            raw.append(b"")
        else:
            raw.append(tensor_to_bytes(array, datatype))
    return message
