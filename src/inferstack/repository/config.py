"""Parsing, validating and rendering Triton ``config.pbtxt`` files.

The file is protobuf text format of ``inference.ModelConfig``; we parse it
with our own copy of that message (``inferstack/_proto/model_config.proto``),
so any valid Triton configuration parses, and fields we do not act on yet are
reported by name instead of silently ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, text_format

from inferstack._proto import model_config_pb2 as mc
from inferstack.core.datatypes import config_to_datatype

log = logging.getLogger("inferstack.repository")

CONFIG_FILENAME = "config.pbtxt"

ModelConfig = mc.ModelConfig


class ModelConfigError(Exception):
    """A configuration that cannot be used; the message names file and reason."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output as requests see it (batch dimension not included).

    ``dims`` is the shape a client sends (``-1`` is any size); ``reshape`` is
    the shape the backend receives instead, if the config asks for one.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False

    def shape_with_batch(self, max_batch_size: int) -> list[int]:
        """The shape shown in model metadata: ``[-1, *dims]`` for batching models."""
        return [-1, *self.dims] if max_batch_size > 0 else list(self.dims)


def parse_config_text(text: str, source: str) -> mc.ModelConfig:
    """Parse protobuf text format; syntax errors name the file, line and column."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
    return config


def read_config(model_dir: Path, *, required: bool) -> mc.ModelConfig:
    """Read ``config.pbtxt`` from a model directory.

    A missing file gives an empty config (to be auto-completed from the model)
    unless ``required`` (``--strict-model-config``) is set.
    """
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        if required:
            raise ModelConfigError(
                f"{path}: missing, and --strict-model-config requires a configuration"
            )
        return mc.ModelConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config_text(text, str(path))


def tensor_specs(tensors: Any) -> list[TensorSpec]:
    """TensorSpecs for the repeated ``input`` or ``output`` field of a config."""
    specs = []
    for tensor in tensors:
        reshape = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
        specs.append(
            TensorSpec(
                name=tensor.name,
                datatype=config_to_datatype(mc.DataType.Name(tensor.data_type)),
                dims=tuple(tensor.dims),
                reshape=reshape,
                optional=bool(getattr(tensor, "optional", False)),
            )
        )
    return specs


# Fields we parse but do not act on yet: the load still succeeds and the log
# says what was ignored, so nobody believes a feature is on when it is not.
_IGNORED_FIELDS = {
    "batch_input": "batch inputs are not supported",
    "batch_output": "batch outputs are not supported",
    "model_operations": "model operations are not supported",
    "model_repository_agents": "repository agents are not supported",
    "cc_model_filenames": "per-compute-capability model files are not supported",
}


def validate_config(config: mc.ModelConfig, model_name: str, source: str) -> list[str]:
    """Check what the backend-independent parts of a config mean.

    Raises ModelConfigError for a config that cannot be served; returns
    warnings for fields that are accepted but have no effect.
    """

    def fail(reason: str) -> None:
        raise ModelConfigError(f"{source}: {reason}")

    warnings: list[str] = []
    if config.name and config.name != model_name:
        fail(f"name {config.name!r} does not match the model directory {model_name!r}")
    if config.max_batch_size < 0:
        fail(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    filename = config.default_model_filename
    # A file name, never a path: a config (or a load request's override) must
    # not point the backend at files outside the version directory.
    if filename and (filename in (".", "..") or "/" in filename or "\\" in filename or "\0" in filename):
        fail(f"default_model_filename {filename!r} must be a file name inside the version directory, not a path")
    for field_name, what in (("input", "input"), ("output", "output")):
        seen: set[str] = set()
        for tensor in getattr(config, field_name):
            if not tensor.name:
                fail(f"an {what} has no name")
            if tensor.name in seen:
                fail(f"{what} {tensor.name!r} is declared twice")
            seen.add(tensor.name)
            if tensor.data_type == mc.TYPE_INVALID:
                fail(f"{what} {tensor.name!r} has no data_type")
            if tensor.data_type == mc.TYPE_BF16:
                fail(f"{what} {tensor.name!r}: TYPE_BF16 is not supported (no numpy equivalent)")
            for dim in tensor.dims:
                if dim == 0 or dim < -1:
                    fail(f"{what} {tensor.name!r} has invalid dims {list(tensor.dims)}")
            if tensor.HasField("reshape"):
                _check_reshape(tensor, what, fail)
    if config.HasField("dynamic_batching"):
        _check_dynamic_batching(config, fail)
    for group in config.instance_group:
        if group.count < 0:
            fail(f"instance_group {group.name or ''!r} has negative count {group.count}")
    if config.model_transaction_policy.decoupled:
        fail("decoupled models (model_transaction_policy.decoupled) are not supported yet")
    # Serving these with the plain scheduler would give wrong answers, not
    # just slower ones: refuse them rather than warn.
    if config.HasField("sequence_batching"):
        fail("sequence_batching (stateful models) is not supported yet")
    if config.HasField("ensemble_scheduling") or config.platform == "ensemble":
        # The graph alone (producers, cycles); the step models are checked once loaded.
        from inferstack.repository.ensemble import EnsembleConfigError, check_ensemble

        try:
            warnings.extend(f"{source}: {warning}" for warning in check_ensemble(config))
        except EnsembleConfigError as exc:
            fail(str(exc))
    for field_name, why in _IGNORED_FIELDS.items():
        if _is_set(config, field_name):
            warnings.append(f"{source}: {field_name} ignored: {why}")
    return warnings


def _check_reshape(tensor: Any, what: str, fail: Any) -> None:
    dims, reshape = list(tensor.dims), list(tensor.reshape.shape)
    if any(d == 0 or d < -1 for d in reshape):
        fail(f"{what} {tensor.name!r} has invalid reshape {reshape}")
    if -1 not in dims and -1 not in reshape:
        from math import prod

        if prod(dims) != prod(reshape):
            fail(
                f"{what} {tensor.name!r}: reshape {reshape} has a different element "
                f"count than dims {dims}"
            )


def _check_dynamic_batching(config: mc.ModelConfig, fail: Any) -> None:
    batching = config.dynamic_batching
    if config.max_batch_size == 0:
        fail("dynamic_batching requires max_batch_size > 0")
    for size in batching.preferred_batch_size:
        if size <= 0 or size > config.max_batch_size:
            fail(
                f"preferred_batch_size {size} must be between 1 and "
                f"max_batch_size {config.max_batch_size}"
            )
    levels = batching.priority_levels
    if levels and not 1 <= batching.default_priority_level <= levels:
        fail(
            f"default_priority_level {batching.default_priority_level} must be between "
            f"1 and priority_levels {levels}"
        )
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            fail(f"priority_queue_policy for level {level} but priority_levels is {levels}")


def _is_set(message: Any, field_name: str) -> bool:
    field = message.DESCRIPTOR.fields_by_name.get(field_name)
    if field is None:
        return False
    if _is_repeated(field):
        return len(getattr(message, field_name)) > 0
    return message.HasField(field_name)


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    # ``label`` is deprecated in newer protobuf releases; ``is_repeated`` is new.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == descriptor.FieldDescriptor.LABEL_REPEATED


def config_to_dict(message: Any) -> dict[str, Any]:
    """Render a config as Triton's JSON does: every field, enums by name, int64 as numbers."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            # JSON object keys are strings (priority_queue_policy has int keys).
            out[field.name] = {
                str(key): _field_value(value_field, item) for key, item in value.items()
            }
        elif _is_repeated(field):
            out[field.name] = [_field_value(field, item) for item in value]
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = config_to_dict(value)
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field: descriptor.FieldDescriptor, value: Any) -> Any:
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        return config_to_dict(value)
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    return value


def config_from_dict(data: dict[str, Any], source: str) -> mc.ModelConfig:
    """Parse a JSON-shaped config (e.g. a load request's override)."""
    from google.protobuf import json_format

    config = mc.ModelConfig()
    try:
        json_format.ParseDict(data, config)
    except json_format.ParseError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
    return config


def parse_config_json(text: str | bytes, source: str) -> mc.ModelConfig:
    """Parse a config given as JSON text (the ``config`` parameter of a load request)."""
    import orjson

    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ModelConfigError(f"{source}: malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ModelConfigError(f"{source}: must be a JSON object")
    return config_from_dict(document, source)


def parameter(config: mc.ModelConfig, key: str) -> str | None:
    """The ``string_value`` of a ``parameters`` entry, or None."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return None


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Apply ``version_policy`` to the versions found on disk (ascending result)."""
    ordered = sorted(available)
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return ordered
    if which == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in ordered if v in wanted]
    count = policy.latest.num_versions if which == "latest" else 1
    count = max(count, 1)
    return ordered[-count:]
