"""Model warmup: Triton's ``model_warmup`` samples, run before a version is READY.

Some models are slow on their first executions (lazy allocation, kernel
selection, caches); warmup pays that price during the load instead of on the
first clients' requests. Each sample is turned into input arrays once, then
executed ``count`` times (at least once) on every instance, in the loading
thread, before the scheduler exists. A sample that cannot be built or whose
execution fails fails the whole load, with the sample's name in the reason:
a version that cannot run its own warmup would fail real requests too.

The inputs follow Triton's rules:

* ``dims`` excludes the batch dimension; a batching model (``max_batch_size >
  0``) gets ``[batch_size, *dims]``, where every row holds the same data (Triton
  sends ``batch_size`` one-row requests built from one buffer);
* ``zero_data``: zeros (empty strings for ``TYPE_STRING``); ``random_data``:
  uniform in [0, 1) for floats, 0..99 for integers, random booleans, empty
  strings for ``TYPE_STRING`` (Triton fills random bytes, which for floats may
  be NaN; we keep the values finite);
* ``input_data_file``: raw little-endian bytes of one row (or of the whole tensor
  without batching), read from the model directory's ``warmup/`` folder; for
  ``TYPE_STRING`` the 4-byte-length-prefixed elements. A longer file is fine (its
  first bytes are used, as in Triton); a shorter one fails the load;
* a sample with ``batch_size: 0`` is skipped, as in Triton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.core.datatypes import config_to_datatype, deserialize_bytes_tensor, numpy_dtype
from inferstack.core.errors import InferenceServerError
from inferstack.repository.config import ModelConfigError

log = logging.getLogger("inferstack.models")

WARMUP_FOLDER = "warmup"


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """One prepared sample: its input arrays (batch dimension included) and repeat count."""

    name: str
    inputs: dict[str, np.ndarray]
    batch_size: int
    count: int


def build_samples(config: mc.ModelConfig, model_dir: Path | None, what: str) -> list[WarmupSample]:
    """The config's warmup samples as arrays; ModelConfigError naming the sample otherwise.

    ``model_dir`` is where ``warmup/`` lives (None: no data files can be read).
    Shapes and datatypes are checked against the model's inputs later, by
    the same code that checks requests.
    """
    samples: list[WarmupSample] = []
    for index, setting in enumerate(config.model_warmup):
        name = setting.name or f"#{index}"
        label = f"{what}: warmup sample {name!r}"
        if setting.batch_size == 0:
            log.warning("%s has batch_size 0 and is skipped (as in Triton)", label)
            continue
        batching = config.max_batch_size > 0
        if batching and setting.batch_size > config.max_batch_size:
            raise ModelConfigError(
                f"{label}: batch_size {setting.batch_size} exceeds max_batch_size {config.max_batch_size}"
            )
        if not batching and setting.batch_size != 1:
            raise ModelConfigError(
                f"{label}: batch_size must be 1 for a model that does not batch (max_batch_size 0), "
                f"got {setting.batch_size}"
            )
        if not setting.inputs:
            raise ModelConfigError(f"{label}: no inputs")
        inputs: dict[str, np.ndarray] = {}
        for input_name, spec in sorted(setting.inputs.items()):
            try:
                row = _row(input_name, spec, model_dir)
            except (ModelConfigError, InferenceServerError, OSError) as exc:
                message = exc.message if isinstance(exc, InferenceServerError) else str(exc)
                raise ModelConfigError(f"{label}: {message}") from None
            if batching:
                row = np.broadcast_to(row[np.newaxis], (setting.batch_size, *row.shape))
                row = np.ascontiguousarray(row)
            inputs[input_name] = row
        samples.append(WarmupSample(name, inputs, setting.batch_size, max(setting.count, 1)))
    return samples


def _row(input_name: str, spec: mc.ModelWarmup.Input, model_dir: Path | None) -> np.ndarray:
    """One row of a warmup input (the whole tensor for a model that does not batch)."""
    dims = tuple(spec.dims)
    if any(d < 1 for d in dims):
        raise ModelConfigError(
            f"input {input_name!r}: dims {list(dims)} must all be specified (>= 1) for warmup"
        )
    if spec.data_type in (mc.TYPE_INVALID, mc.TYPE_BF16):
        raise ModelConfigError(f"input {input_name!r}: data_type {mc.DataType.Name(spec.data_type)} "
                               "cannot be used for warmup")
    datatype = config_to_datatype(mc.DataType.Name(spec.data_type))
    dtype = numpy_dtype(datatype)
    count = prod(dims)
    source = spec.WhichOneof("input_data_type")
    if source is None:
        raise ModelConfigError(
            f"input {input_name!r}: set one of zero_data, random_data or input_data_file"
        )
    if source == "input_data_file":
        data = _read_data_file(input_name, spec.input_data_file, model_dir)
        if datatype == "BYTES":
            return deserialize_bytes_tensor(data, count, input_name).reshape(dims)
        needed = count * dtype.itemsize
        if len(data) < needed:
            raise ModelConfigError(
                f"input {input_name!r}: needs {needed} bytes ({list(dims)} x {datatype}), but "
                f"{spec.input_data_file!r} has only {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype, count=count).reshape(dims).copy()
    if datatype == "BYTES":
        return np.full(dims, b"", dtype=np.object_)
    if source == "zero_data":
        return np.zeros(dims, dtype=dtype)
    rng = np.random.default_rng()
    if dtype.kind == "b":
        return rng.integers(0, 2, size=dims).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=dims).astype(dtype)
    return rng.random(size=dims).astype(dtype)


def _read_data_file(input_name: str, relative: str, model_dir: Path | None) -> bytes:
    """A file from ``<model>/warmup/``; refused if the name (or a symlink) leads elsewhere."""
    if model_dir is None:
        raise ModelConfigError(f"input {input_name!r}: input_data_file needs a model directory")
    folder = (model_dir / WARMUP_FOLDER).resolve()
    path = (folder / relative).resolve()
    if not relative or Path(relative).is_absolute() or not path.is_relative_to(folder):
        raise ModelConfigError(
            f"input {input_name!r}: input_data_file {relative!r} must name a file inside the "
            f"model's {WARMUP_FOLDER}/ folder"
        )
    if not path.is_file():
        raise ModelConfigError(
            f"input {input_name!r}: input_data_file {relative!r} not found in {folder}"
        )
    return path.read_bytes()
