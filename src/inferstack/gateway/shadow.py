"""Shadow traffic: compare a mirrored answer with the primary's, off the request path.

Both answers are decoded into arrays by output name (HTTP JSON or binary
tensor data, or a gRPC ``ModelInferResponse``) and compared with
``numpy.allclose(atol, rtol)``; different output names, shapes or datatypes
are a mismatch too. Decoding happens only for the sampled shadow share and
after the client has its answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from inferstack.core.datatypes import deserialize_bytes_tensor, numpy_dtype


def decode_http_response(body: bytes, headers: dict[str, str]) -> dict[str, np.ndarray]:
    length = headers.get("inference-header-content-length")
    header_len = int(length) if length else len(body)
    document = orjson.loads(body[:header_len])
    offset = header_len
    outputs: dict[str, np.ndarray] = {}
    for output in document.get("outputs", []):
        datatype = output["datatype"]
        shape = output.get("shape", [])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[offset: offset + size]
            offset += size
            outputs[output["name"]] = _from_bytes(raw, datatype, shape, output["name"])
        else:
            data = output.get("data", [])
            if datatype == "BYTES":
                array = np.array([d.encode() if isinstance(d, str) else d for d in data], dtype=object)
            else:
                array = np.array(data, dtype=numpy_dtype(datatype))
            outputs[output["name"]] = array.reshape(shape)
    return outputs


def _from_bytes(raw: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    if datatype == "BYTES":
        count = int(np.prod(shape)) if shape else 1
        return deserialize_bytes_tensor(raw, count, name).reshape(shape)
    return np.frombuffer(raw, dtype=numpy_dtype(datatype)).reshape(shape)


def decode_grpc_response(data: bytes) -> dict[str, np.ndarray]:
    from inferstack._proto import grpc_service_pb2 as pb

    response = pb.ModelInferResponse.FromString(data)
    outputs: dict[str, np.ndarray] = {}
    for i, output in enumerate(response.outputs):
        shape = list(output.shape)
        if i < len(response.raw_output_contents):
            outputs[output.name] = _from_bytes(response.raw_output_contents[i], output.datatype, shape, output.name)
        else:
            contents = output.contents
            field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                     "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                     "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                     "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(output.datatype)
            values: Any = list(getattr(contents, field)) if field else []
            dtype = object if output.datatype == "BYTES" else numpy_dtype(output.datatype)
            outputs[output.name] = np.array(values, dtype=dtype).reshape(shape)
    return outputs


def differs(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], atol: float, rtol: float) -> str | None:
    """None when the answers agree, else a short description of the first difference."""
    if set(primary) != set(shadow):
        return f"outputs {sorted(primary)} vs {sorted(shadow)}"
    for name, a in primary.items():
        b = shadow[name]
        if a.shape != b.shape:
            return f"{name}: shape {list(a.shape)} vs {list(b.shape)}"
        if a.dtype == object or b.dtype == object:
            if a.dtype != b.dtype or not np.array_equal(a, b):
                return f"{name}: values differ"
            continue
        if a.dtype != b.dtype:
            return f"{name}: datatype {a.dtype} vs {b.dtype}"
        if a.dtype.kind in "fc":
            if not np.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
                worst = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                return f"{name}: max abs difference {worst:g}"
        elif not np.array_equal(a, b):
            return f"{name}: values differ"
    return None
