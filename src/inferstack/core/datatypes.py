"""The protocol's tensor datatypes and their numpy equivalents.

KServe v2 names datatypes ``FP32``, ``INT64``, ``BYTES`` ...; Triton's model
configuration names the same ones ``TYPE_FP32``, ``TYPE_INT64``,
``TYPE_STRING``. BYTES tensors are numpy ``object`` arrays holding ``bytes``;
every fixed-size type is little-endian on the wire.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from inferstack.core.errors import InvalidArgumentError

#: v2 datatype name -> numpy dtype (explicit little-endian for the wire).
_NUMPY_BY_DATATYPE: Final[dict[str, np.dtype]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

DATATYPES: Final[frozenset[str]] = frozenset(_NUMPY_BY_DATATYPE)

#: numpy dtype (native order) -> v2 datatype name.
_DATATYPE_BY_NUMPY: Final[dict[np.dtype, str]] = {
    dt.newbyteorder("="): name for name, dt in _NUMPY_BY_DATATYPE.items()
}
_DATATYPE_BY_NUMPY[np.dtype(np.bytes_)] = "BYTES"
_DATATYPE_BY_NUMPY[np.dtype(np.str_)] = "BYTES"


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a v2 datatype name; raises naming the bad value."""
    try:
        return _NUMPY_BY_DATATYPE[datatype]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"unsupported datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}"
        ) from None


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array (BYTES for object/str/bytes arrays)."""
    dtype = array.dtype
    if dtype.kind in "SUO":
        return "BYTES"
    try:
        return _DATATYPE_BY_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        raise InvalidArgumentError(f"numpy dtype {dtype} has no v2 datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype; 0 for BYTES (variable)."""
    if datatype == "BYTES":
        return 0
    return numpy_dtype(datatype).itemsize


# Triton's model configuration spells datatypes with a TYPE_ prefix and calls
# BYTES "STRING".
def config_to_datatype(config_name: str) -> str:
    """``TYPE_FP32`` -> ``FP32``; ``TYPE_STRING`` -> ``BYTES``."""
    name = config_name.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def datatype_to_config(datatype: str) -> str:
    """``FP32`` -> ``TYPE_FP32``; ``BYTES`` -> ``TYPE_STRING``."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


_LENGTH = struct.Struct("<I")


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """Encode a BYTES tensor as the protocol's 4-byte-length-prefixed elements."""
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        append(_LENGTH.pack(len(item)))
        append(bytes(item))
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Decode ``count`` length-prefixed elements; the buffer must hold exactly them."""
    view = memoryview(buffer)
    total = len(view)
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for index in range(count):
        if offset + 4 > total:
            raise InvalidArgumentError(
                f"input {name!r}: BYTES data ends after {index} of {count} elements"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidArgumentError(
                f"input {name!r}: BYTES element {index} claims {length} bytes, "
                f"only {total - offset} remain"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise InvalidArgumentError(
            f"input {name!r}: {total - offset} trailing bytes after {count} BYTES elements"
        )
    return out


def bytes_tensor_size(array: np.ndarray) -> int:
    """Serialized size of a BYTES tensor (without building it)."""
    size = 0
    for item in array.reshape(-1):
        if isinstance(item, str):
            size += 4 + len(item.encode("utf-8"))
        else:
            size += 4 + len(item)
    return size
