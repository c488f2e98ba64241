"""Tensor encodings shared by every transport: shapes, raw bytes <-> numpy.

The REST binary extension, gRPC ``raw_input_contents`` and shared memory all
carry a tensor as the same bytes: little-endian elements, or for BYTES
4-byte-length-prefixed items. Decoding is ``np.frombuffer`` (no copy, no
per-element loop); every size mismatch is an InvalidArgumentError naming the
input and both sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from inferstack.core.datatypes import deserialize_bytes_tensor, numpy_dtype, serialize_bytes_tensor
from inferstack.core.errors import InvalidArgumentError

#: Refuse shapes claiming more elements than this, whatever the body holds.
MAX_ELEMENTS = 1 << 40
#: More dimensions than any real model has; bounds the work a claimed shape can cause.
MAX_DIMS = 32


def is_int(value: Any) -> bool:
    """A JSON/protobuf integer (``bool`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(dims: Sequence[Any], name: str) -> tuple[int, ...]:
    """Validate a claimed shape: non-negative integers, bounded rank and element count."""
    if len(dims) > MAX_DIMS:
        raise InvalidArgumentError(f"input {name!r}: shape {list(dims)} has more than {MAX_DIMS} dimensions")
    count = 1
    for dim in dims:
        if not is_int(dim) or dim < 0:
            raise InvalidArgumentError(
                f"input {name!r}: 'shape' {list(dims)!r} must hold non-negative integers"
            )
        count *= dim
        if count > MAX_ELEMENTS:
            raise InvalidArgumentError(
                f"input {name!r}: shape {list(dims)} claims more than {MAX_ELEMENTS} elements"
            )
    return tuple(dims)


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def tensor_from_bytes(
    buffer: bytes | memoryview, shape: tuple[int, ...], datatype: str, name: str,
    *, source: str = "binary_data_size",
) -> np.ndarray:
    """A tensor viewing ``buffer`` (zero-copy for fixed-size types).

    ``source`` names where the bytes came from in error messages
    (``binary_data_size``, ``raw_input_contents``, a shared memory region).
    """
    count = element_count(shape)
    size = len(buffer)
    if datatype == "BYTES":
        # Every element takes at least its 4-byte length prefix: refuse a shape
        # the data cannot fill before allocating an array for ``count`` elements.
        if count * 4 > size:
            raise InvalidArgumentError(
                f"input {name!r}: shape {list(shape)} of BYTES needs at least {count * 4} "
                f"bytes (4 per element), {source} is {size}"
            )
        return deserialize_bytes_tensor(buffer, count, name).reshape(shape)
    dtype = numpy_dtype(datatype)
    if count * dtype.itemsize != size:
        raise InvalidArgumentError(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} "
            f"bytes, {source} is {size}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """The raw wire bytes of an output tensor."""
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    return np.ascontiguousarray(array).tobytes()
