"""Request inputs for ``inferstack perf``, built from the model's metadata.

The model's metadata (``GET /v2/models/{m}`` or gRPC ``ModelMetadata``) gives
each input's name, datatype and shape. Dimensions of ``-1`` are dynamic: the
size to send comes from ``--shape NAME:D1,D2`` (or from the JSON data file),
otherwise perf stops with a message saying which input needs one.

Batching: when the model configuration is available (Triton's
``model_configuration`` extension), ``max_batch_size > 0`` means the first
dimension is the batch dimension, filled with ``-b``. Without a configuration
(a plain KServe v2 server) the first dimension counts as the batch dimension
when it is ``-1`` for every input. ``--shape`` never includes the batch
dimension of a batching model (as in perf_analyzer).

Data: ``zero`` (zeros, empty strings), ``random`` (seeded: floats in [0, 1),
integers in [0, 64), random booleans, 8-character ASCII strings) or a JSON
file in perf_analyzer's format::

    {"data": [
        {"INPUT0": [0.1, 0.2, ...]},                              # flat or nested values
        {"INPUT0": {"content": [...], "shape": [64]}},            # explicit shape
        {"INPUT0": {"b64": "<base64 of the raw little-endian bytes>"}}
    ]}

Each entry holds one sample per input (without the batch dimension for a
batching model). Request ``k`` of ``n`` distinct requests stacks entries
``k, k+1, ..., k+b-1`` (wrapping around); requests cycle through them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from inferstack.core.datatypes import DATATYPES, numpy_dtype, serialize_bytes_tensor
from inferstack.perf.clients import PerfSetupError


class InputError(PerfSetupError):
    """The inputs cannot be built from the metadata and the options given."""


@dataclass(slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass(slots=True)
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: From the model configuration; None when the server has no configuration extension.
    max_batch_size: int | None = None

    @property
    def batching(self) -> bool:
        if self.max_batch_size is not None:
            return self.max_batch_size > 0
        return bool(self.inputs) and all(t.shape and t.shape[0] == -1 for t in self.inputs)


def _tensor(doc: Any, where: str) -> TensorSpec:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise InputError(f"model metadata: {where} is not a tensor description: {doc!r}")
    shape = doc.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise InputError(f"model metadata: {where} {doc['name']!r} has no valid shape: {shape!r}")
    return TensorSpec(doc["name"], str(doc.get("datatype", "")), [int(d) for d in shape])


def model_info(metadata: dict[str, Any], config: dict[str, Any] | None = None) -> ModelInfo:
    """ModelInfo from a KServe v2 metadata document (and Triton's config, when available)."""
    inputs = [_tensor(t, f"inputs[{i}]") for i, t in enumerate(metadata.get("inputs") or [])]
    outputs = [_tensor(t, f"outputs[{i}]") for i, t in enumerate(metadata.get("outputs") or [])]
    if not inputs:
        raise InputError(f"model {metadata.get('name')!r} declares no inputs in its metadata")
    for t in inputs:
        if t.datatype not in DATATYPES:
            raise InputError(f"input {t.name!r}: datatype {t.datatype!r} is not supported by perf")
    mbs = None
    if config is not None:
        value = config.get("max_batch_size", 0)
        try:
            mbs = int(value)
        except (TypeError, ValueError):
            mbs = None
    return ModelInfo(
        name=str(metadata.get("name", "")),
        versions=[str(v) for v in metadata.get("versions") or []],
        platform=str(metadata.get("platform", "")),
        inputs=inputs,
        outputs=outputs,
        max_batch_size=mbs,
    )


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def parse_shape_options(options: list[str] | None) -> dict[str, list[int]]:
    """``["INPUT0:3,224,224", ...]`` -> ``{"INPUT0": [3, 224, 224]}``."""
    shapes: dict[str, list[int]] = {}
    for option in options or ():
        name, sep, dims = option.rpartition(":")
        if not sep or not name:
            raise InputError(f"--shape {option!r}: expected NAME:D1,D2,... (for example INPUT0:3,224,224)")
        try:
            values = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise InputError(f"--shape {option!r}: dimensions must be integers separated by commas") from None
        if any(v < 0 for v in values):
            raise InputError(f"--shape {option!r}: dimensions must be >= 0")
        if name in shapes:
            raise InputError(f"--shape given twice for input {name!r}")
        shapes[name] = values
    return shapes


def sample_shapes(model: ModelInfo, shapes: dict[str, list[int]], batch_size: int,
                  require: bool = True) -> dict[str, list[int] | None]:
    """Each input's shape for one sample: without the batch dimension of a batching model.

    Checks ``-b`` against the model's batching and every ``--shape`` against the
    metadata; a dynamic dimension without a ``--shape`` is an error naming the
    input (``require=False``: None, for data files whose entries carry shapes).
    """
    if batch_size < 1:
        raise InputError(f"-b {batch_size}: the batch size must be at least 1")
    if model.batching:
        if model.max_batch_size is not None and batch_size > model.max_batch_size:
            raise InputError(f"-b {batch_size}: model {model.name!r} has max_batch_size {model.max_batch_size}")
    elif batch_size != 1:
        raise InputError(f"-b {batch_size}: model {model.name!r} does not support batching "
                         "(max_batch_size 0); use -b 1 and give the full shape")
    known = {t.name for t in model.inputs}
    for name in shapes:
        if name not in known:
            raise InputError(f"--shape {name}:...: the model has no input {name!r} "
                             f"(inputs: {', '.join(sorted(known))})")
    out: dict[str, list[int] | None] = {}
    for t in model.inputs:
        dims = t.shape[1:] if model.batching else list(t.shape)
        given = shapes.get(t.name)
        if given is not None:
            if len(given) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, given)):
                what = "without the batch dimension " if model.batching else ""
                raise InputError(f"--shape {t.name}:{','.join(map(str, given))} does not match the model's "
                                 f"shape {dims} {what}(-1 = any size)")
            out[t.name] = list(given)
        elif any(d < 0 for d in dims) and not require:
            out[t.name] = None
        elif any(d < 0 for d in dims):
            example = ",".join("1" if d < 0 else str(d) for d in dims)
            raise InputError(f"input {t.name!r} has a dynamic shape {dims}"
                             + (" (without the batch dimension)" if model.batching else "")
                             + f": give its size with --shape {t.name}:{example}")
        else:
            out[t.name] = dims
    return out


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _zero(datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(shape, dtype=np.object_)
        array.fill(b"")
        return array
    return np.zeros(shape, dtype=numpy_dtype(datatype))


def _random(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        count = int(np.prod(shape, dtype=np.int64))
        letters = rng.integers(ord("a"), ord("z") + 1, size=(count, 8), dtype=np.uint8)
        array = np.empty(count, dtype=np.object_)
        array[:] = [row.tobytes() for row in letters]
        return array.reshape(shape)
    dtype = numpy_dtype(datatype)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind == "f":
        return rng.random(size=shape).astype(dtype)
    return rng.integers(0, 64, size=shape).astype(dtype)


def _from_json_value(value: Any, spec: TensorSpec, shape: list[int] | None, entry: int) -> np.ndarray:
    where = f"input data entry {entry}, input {spec.name!r}"
    if isinstance(value, dict):
        if "shape" in value:
            given = value["shape"]
            if not isinstance(given, list) or not all(isinstance(d, int) and d >= 0 for d in given):
                raise InputError(f"{where}: 'shape' must be a list of non-negative integers")
            shape = given
        if "b64" in value:
            try:
                raw = base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError):
                raise InputError(f"{where}: 'b64' is not valid base64") from None
            if shape is None:
                raise InputError(f"{where}: b64 data needs a 'shape' (or --shape {spec.name}:...)")
            if spec.datatype == "BYTES":
                raise InputError(f"{where}: b64 data is for fixed-size datatypes; give BYTES elements as strings")
            dtype = numpy_dtype(spec.datatype)
            count = int(np.prod(shape, dtype=np.int64))
            if len(raw) != count * dtype.itemsize:
                raise InputError(f"{where}: b64 data is {len(raw)} bytes, shape {shape} of {spec.datatype} "
                                 f"needs {count * dtype.itemsize}")
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
        if "content" not in value:
            raise InputError(f"{where}: expected a list, or an object with 'content' (and 'shape') or 'b64'")
        value = value["content"]
    if not isinstance(value, list):
        value = [value]
    if spec.datatype == "BYTES":
        flat = _flatten(value)
        array = _bytes_array(flat, [len(flat)])
        nested_shape = list(np.shape(np.asarray(value, dtype=object))) if value else [0]
    else:
        try:
            array = np.asarray(value, dtype=numpy_dtype(spec.datatype))
        except (ValueError, TypeError, OverflowError) as exc:
            raise InputError(f"{where}: values do not fit {spec.datatype}: {exc}") from None
        nested_shape = list(array.shape)
    if shape is None:
        shape = nested_shape  # nested lists carry their own shape
    if int(np.prod(shape, dtype=np.int64)) != array.size:
        raise InputError(f"{where}: {array.size} values do not fill shape {shape}")
    return array.reshape(shape)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            out.extend(_flatten(item))
        return out
    return [value]


def _bytes_array(items: list[Any], shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = [item.encode("utf-8") if isinstance(item, str) else
                item if isinstance(item, bytes) else str(item).encode("utf-8") for item in items]
    return array.reshape(shape)


def load_data_file(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"--input-data {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"--input-data {path}: not valid JSON: {exc}") from None
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"--input-data {path}: expected {{\"data\": [{{\"INPUT\": [...]}}, ...]}} "
                         "with at least one entry")
    return entries


def build_inputs(model: ModelInfo, shapes: dict[str, list[int]], batch_size: int, data: str,
                 seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The distinct requests' input tensors (full shapes, batch dimension included).

    ``data`` is ``zero``, ``random`` or the path of a JSON data file.
    """
    file_data = data not in ("zero", "random")
    samples = sample_shapes(model, shapes, batch_size, require=not file_data)
    batching = model.batching
    if not file_data:
        rng = np.random.default_rng(seed)
        tensors = {}
        for t in model.inputs:
            full = [batch_size, *samples[t.name]] if batching else samples[t.name]
            tensors[t.name] = _zero(t.datatype, full) if data == "zero" else _random(t.datatype, full, rng)
        return [tensors]

    entries = load_data_file(Path(data))
    known = {t.name for t in model.inputs}
    per_entry: list[dict[str, np.ndarray]] = []
    for index, entry in enumerate(entries):
        unknown = set(entry) - known
        if unknown:
            raise InputError(f"--input-data entry {index}: the model has no input(s) {sorted(unknown)} "
                             f"(inputs: {', '.join(sorted(known))})")
        missing = [t.name for t in model.inputs if t.name not in entry]
        if missing:
            raise InputError(f"--input-data entry {index}: no data for input {missing[0]!r}")
        arrays = {}
        for t in model.inputs:
            array = _from_json_value(entry[t.name], t, samples[t.name], index)
            dims = t.shape[1:] if batching else t.shape
            if len(array.shape) != len(dims) or any(d >= 0 and d != a for d, a in zip(dims, array.shape)):
                raise InputError(f"--input-data entry {index}, input {t.name!r}: shape {list(array.shape)} does "
                                 f"not match the model's {dims}" + (" (without the batch dimension)" if batching else "")
                                 + f"; give the entry a 'shape' or use --shape {t.name}:...")
            arrays[t.name] = array
        per_entry.append(arrays)

    if not batching:
        return per_entry
    requests = []
    for k in range(len(per_entry)):
        rows = [per_entry[(k + j) % len(per_entry)] for j in range(batch_size)]
        tensors = {}
        for t in model.inputs:
            parts = [row[t.name] for row in rows]
            if any(p.shape != parts[0].shape for p in parts):
                raise InputError(f"--input-data: input {t.name!r} has different shapes in the entries stacked "
                                 f"into one batch of {batch_size}; give every entry the same shape")
            tensors[t.name] = np.stack(parts)
        requests.append(tensors)
    return requests


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    """The wire bytes of a tensor: little-endian elements, or length-prefixed BYTES items."""
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    return np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()


@dataclass(slots=True)
class EncodedInput:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes


def encode_tensors(model: ModelInfo, tensors: dict[str, np.ndarray]) -> list[EncodedInput]:
    return [EncodedInput(t.name, t.datatype, list(tensors[t.name].shape), raw_bytes(tensors[t.name], t.datatype))
            for t in model.inputs]


def http_body(model: ModelInfo, tensors: dict[str, np.ndarray], binary: bool) -> tuple[bytes, int | None]:
    """(body, Inference-Header-Content-Length or None) of a REST infer request.

    Binary: inputs as raw bytes after the JSON header, every output asked for in
    binary. JSON: inputs as JSON ``data``, outputs as JSON too.
    """
    outputs = [{"name": o.name, "parameters": {"binary_data": binary}} for o in model.outputs]
    if binary:
        encoded = encode_tensors(model, tensors)
        header = orjson.dumps({
            "inputs": [{"name": e.name, "shape": e.shape, "datatype": e.datatype,
                        "parameters": {"binary_data_size": len(e.raw)}} for e in encoded],
            "outputs": outputs,
        })
        return header + b"".join(e.raw for e in encoded), len(header)
    inputs = []
    for t in model.inputs:
        array = tensors[t.name]
        if t.datatype == "BYTES":
            values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        else:
            values = array.reshape(-1).tolist()
        inputs.append({"name": t.name, "shape": list(array.shape), "datatype": t.datatype, "data": values})
    return orjson.dumps({"inputs": inputs, "outputs": outputs}), None


def encode_requests(client: Any, model: ModelInfo, tensors: list[Any], protocol: str, binary: bool) -> list[bytes]:
    """Pre-encode one wire request per input set, for ``client`` (HTTP or gRPC)."""
    requests: list[bytes] = []
    for t in tensors:
        if protocol == "grpc":
            encoded = encode_tensors(model, t)
            requests.append(client.infer_request([(e.name, e.datatype, e.shape, e.raw) for e in encoded],
                                                 [o.name for o in model.outputs]))
        else:
            body, header_length = http_body(model, t, binary)
            requests.append(client.infer_request(body, header_length))
    return requests
