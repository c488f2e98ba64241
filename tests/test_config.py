"""config.pbtxt parsing and validation, version policy, repository layout, ONNX auto-complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferstack.backends.onnxruntime import OnnxRuntimeBackend
from inferstack.core.errors import InvalidArgumentError
from inferstack.repository import ModelConfigError, ModelRepository
from inferstack.repository.config import (
    config_to_dict,
    parse_config_text,
    read_config,
    select_versions,
    tensor_specs,
    validate_config,
)
from inferstack.repository.repository import check_model_name
from inferstack.testing import onnx_models

FULL = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
output [ { name: "OUT" data_type: TYPE_STRING dims: [ -1 ] } ]
version_policy: { specific: { versions: [ 1, 3 ] } }
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 5 timeout_action: DELAY default_timeout_microseconds: 10 }
  priority_queue_policy { key: 1 value: { max_queue_size: 7 } }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def test_full_config_parses_and_validates():
    config = parse_config_text(FULL, "m/config.pbtxt")
    assert validate_config(config, "m", "m/config.pbtxt") == []
    assert config.dynamic_batching.priority_queue_policy[1].max_queue_size == 7
    (spec,) = tensor_specs(config.input)
    assert (spec.name, spec.datatype, spec.dims, spec.reshape) == ("IN", "FP32", (2, 2), (4,))
    assert tensor_specs(config.output)[0].datatype == "BYTES"


def test_syntax_error_names_file_line_and_column():
    with pytest.raises(ModelConfigError, match=r"m/config.pbtxt: 2:\d+"):
        parse_config_text('max_batch_size: 4\ninput [ { name: "X" ', "m/config.pbtxt")


def test_unknown_field_is_named():
    with pytest.raises(ModelConfigError, match="max_batch_sise"):
        parse_config_text("max_batch_sise: 4", "cfg")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name: "other"', "does not match the model directory"),
        ("max_batch_size: -1", "max_batch_size must be >= 0"),
        ("max_batch_size: 0 dynamic_batching { }", "requires max_batch_size > 0"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }", "preferred_batch_size 8"),
        ('input [ { name: "A" data_type: TYPE_FP32 dims: [1] }, { name: "A" data_type: TYPE_FP32 dims: [1] } ]',
         "declared twice"),
        ('input [ { name: "A" dims: [1] } ]', "has no data_type"),
        ('input [ { name: "A" data_type: TYPE_FP32 dims: [ 0 ] } ]', "invalid dims"),
        ('input [ { name: "A" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 5 ] } } ]',
         "different element count"),
        ("max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
         "default_priority_level 3"),
        ("model_transaction_policy { decoupled: true }", "decoupled"),
        ("max_batch_size: 4 sequence_batching { }", "sequence_batching"),
        ('input [ { name: "A" data_type: TYPE_BF16 dims: [ 1 ] } ]', "TYPE_BF16"),
    ],
)
def test_semantic_errors(text, message):
    config = parse_config_text(text, "cfg")
    with pytest.raises(ModelConfigError, match=message):
        validate_config(config, "m", "cfg")


def test_fields_we_do_not_act_on_are_reported_and_the_rest_are_not():
    config = parse_config_text(
        'max_batch_size: 4 batch_input [ { target_name: "x" } ] model_operations { op_library_filename: "a.so" } '
        'response_cache { enable: true } model_warmup [ { name: "w" } ]',
        "cfg",
    )
    warnings = validate_config(config, "m", "cfg")
    assert any("batch_input ignored" in w for w in warnings)
    assert any("model_operations ignored" in w for w in warnings)
    # Acted on (serving/cache.py, serving/warmup.py): no warning.
    assert not any("response_cache" in w or "model_warmup" in w for w in warnings)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [5]),
        ("version_policy: { latest: { num_versions: 2 } }", [3, 5]),
        ("version_policy: { all: { } }", [1, 3, 5]),
        ("version_policy: { specific: { versions: [ 1, 4 ] } }", [1]),
    ],
)
def test_version_policy(policy, expected):
    assert select_versions(parse_config_text(policy, "cfg"), [5, 1, 3]) == expected


def test_config_json_uses_enum_names_and_numbers():
    rendered = config_to_dict(parse_config_text(FULL, "cfg"))
    assert rendered["max_batch_size"] == 8
    assert rendered["input"][0]["data_type"] == "TYPE_FP32"
    assert rendered["input"][0]["dims"] == [2, 2]
    assert rendered["instance_group"][0]["kind"] == "KIND_CPU"
    assert rendered["dynamic_batching"]["priority_queue_policy"]["1"]["max_queue_size"] == 7
    assert rendered["parameters"]["intra_op_thread_count"]["string_value"] == "1"


def test_missing_config_is_empty_unless_strict(tmp_path: Path):
    assert read_config(tmp_path, required=False).max_batch_size == 0
    with pytest.raises(ModelConfigError, match="strict-model-config"):
        read_config(tmp_path, required=True)


def test_repository_layout(tmp_path: Path):
    for name in ("1", "2", "010", "x", ".hidden"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "file.txt").write_text("")
    repository = ModelRepository(tmp_path)
    assert repository.model_names() == ["m"]
    assert repository.versions("m") == [1, 2]  # "010" starts with 0, "x" is not a number


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", "/abs", ".hidden", "", "a\x00b"])
def test_model_names_cannot_escape_the_repository(name, tmp_path: Path):
    with pytest.raises(InvalidArgumentError):
        check_model_name(name)
    with pytest.raises(InvalidArgumentError):
        ModelRepository(tmp_path).model_dir(name)


def test_symlink_out_of_the_repository_is_refused(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "repo"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(InvalidArgumentError, match="outside the repository"):
        ModelRepository(root).model_dir("link")


def _onnx(tmp_path: Path, model: bytes) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    return path


def test_onnx_auto_complete_fills_a_missing_config(tmp_path: Path):
    config = parse_config_text("", "cfg")
    OnnxRuntimeBackend().complete_config(config, _onnx(tmp_path, onnx_models.mlp()), strict=False)
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [64])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT0", [10])]


def test_onnx_auto_complete_without_batch_dimension(tmp_path: Path):
    config = parse_config_text("", "cfg")
    model = onnx_models.identity("INT8", [2, 3], batch=False)
    OnnxRuntimeBackend().complete_config(config, _onnx(tmp_path, model), strict=False)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 3]


def test_onnx_fills_outputs_when_only_inputs_are_declared(tmp_path: Path):
    config = parse_config_text('max_batch_size: 8 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]', "cfg")
    OnnxRuntimeBackend().complete_config(config, _onnx(tmp_path, onnx_models.mlp()), strict=False)
    assert [t.name for t in config.output] == ["OUTPUT0"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('max_batch_size: 8 input [ { name: "NOPE" data_type: TYPE_FP32 dims: [ 64 ] } ]', "not in the model"),
        ('max_batch_size: 8 input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 64 ] } ]', "TYPE_INT32"),
        ('max_batch_size: 8 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 32 ] } ]', "do not match"),
        ('max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]', "do not match"),
    ],
)
def test_onnx_config_that_contradicts_the_model_is_refused(tmp_path: Path, text, message):
    config = parse_config_text(text, "cfg")
    with pytest.raises(ModelConfigError, match=message):
        OnnxRuntimeBackend().complete_config(config, _onnx(tmp_path, onnx_models.mlp()), strict=False)


def test_strict_config_requires_declared_tensors(tmp_path: Path):
    config = parse_config_text("max_batch_size: 8", "cfg")
    with pytest.raises(ModelConfigError, match="declares no inputs"):
        OnnxRuntimeBackend().complete_config(config, _onnx(tmp_path, onnx_models.mlp()), strict=True)


def test_gpu_instance_without_cuda_fails_clearly(tmp_path: Path):
    from inferstack.backends.base import InstanceSpec

    config = parse_config_text("max_batch_size: 8", "cfg")
    path = _onnx(tmp_path, onnx_models.mlp())
    OnnxRuntimeBackend().complete_config(config, path, strict=False)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelConfigError, match="KIND_GPU needs the CUDA execution provider"):
        OnnxRuntimeBackend().load(config, path, InstanceSpec("gpu_0", "KIND_GPU"))
