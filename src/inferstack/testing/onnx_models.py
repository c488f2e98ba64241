"""Small ONNX models built in code, so no weights are ever downloaded.

Used by the example repository generator (``examples/generate_models.py``),
the test suite and the benchmarks. Every builder returns serialized model
bytes; ``write_model`` lays one out in a Triton-style repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# IR version / opset that every onnxruntime since 1.16 loads.
_OPSET = [helper.make_opsetid("", 17)]
_IR_VERSION = 8


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=_OPSET, producer_name="inferstack")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp(in_features: int = 64, hidden: int = 256, out_features: int = 10, *, seed: int = 0) -> bytes:
    """``INPUT0`` FP32 [B, in] -> Gemm+Relu -> Gemm -> ``OUTPUT0`` FP32 [B, out] (logits)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((hidden, out_features)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(out_features) * 0.01).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["INPUT0", "W1", "B1"], ["H"]),
            helper.make_node("Relu", ["H"], ["HR"]),
            helper.make_node("Gemm", ["HR", "W2", "B2"], ["OUTPUT0"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "B1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "B2"),
        ],
    )
    return _model(graph)


def mlp_reference(x: np.ndarray, *, in_features: int = 64, hidden: int = 256,
                  out_features: int = 10, seed: int = 0) -> np.ndarray:
    """What :func:`mlp` computes, in numpy (for checking answers)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((hidden, out_features)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(out_features) * 0.01).astype(np.float32)
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity(datatype: str = "FP32", dims: list[int | str] | None = None, *, batch: bool = True) -> bytes:
    """``INPUT0`` -> Identity -> ``OUTPUT0`` of any datatype (the datatype round-trip model)."""
    shape: list[int | str] = list(dims if dims is not None else [-1])
    shape = ["d%d" % i if d == -1 else d for i, d in enumerate(shape)]
    if batch:
        shape = ["batch", *shape]
    elem = _ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", elem, shape)],
        [helper.make_tensor_value_info("OUTPUT0", elem, shape)],
    )
    return _model(graph)


def add_sub(dims: int = 16, *, datatype: str = "FP32") -> bytes:
    """Triton's classic example: ``OUTPUT0 = INPUT0 + INPUT1``, ``OUTPUT1 = INPUT0 - INPUT1``."""
    elem = _ONNX_TYPES[datatype]
    shape = ["batch", dims]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [
            helper.make_tensor_value_info("INPUT0", elem, shape),
            helper.make_tensor_value_info("INPUT1", elem, shape),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", elem, shape),
            helper.make_tensor_value_info("OUTPUT1", elem, shape),
        ],
    )
    return _model(graph)


def slow_identity(dims: int = 4, *, repeats: int = 100, size: int = 128) -> bytes:
    """FP32 identity that first burns CPU: ``repeats`` chained ``size``² MatMul+Tanh.

    The work depends on the input (so ONNX Runtime cannot fold it away) and
    costs the same whatever the batch size, while the output equals the input:
    tests can check answers while the model is slow enough for queues to form.
    """
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    start = rng.standard_normal((size, size)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceSum", ["INPUT0"], ["IN_SUM"], keepdims=0),
        helper.make_node("Mul", ["IN_SUM", "ZERO"], ["IN_ZERO"]),
        helper.make_node("Add", ["START", "IN_ZERO"], ["Z0"]),
    ]
    current = "Z0"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [current, "W"], [f"M{i}"]))
        nodes.append(helper.make_node("Tanh", [f"M{i}"], [f"Z{i + 1}"]))
        current = f"Z{i + 1}"
    # Tanh keeps every value in [-1, 1], so sum * 0 is exactly 0.
    nodes += [
        helper.make_node("ReduceSum", [current], ["S"], keepdims=0),
        helper.make_node("Mul", ["S", "ZERO"], ["S0"]),
        helper.make_node("Add", ["INPUT0", "S0"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", dims])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", dims])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(start, "START"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "ZERO"),
        ],
    )
    return _model(graph)


def add_constant(value: float, dims: int = 4) -> bytes:
    """FP32 ``OUTPUT0 = INPUT0 + value`` (tells versions apart)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "C"], ["OUTPUT0"])],
        "add_constant",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", dims])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", dims])],
        initializer=[numpy_helper.from_array(np.array(value, dtype=np.float32), "C")],
    )
    return _model(graph)


def write_model(repository: Path, name: str, model: bytes, config: str | None = None,
                versions: tuple[int, ...] = (1,), filename: str = "model.onnx") -> Path:
    """Lay out ``repository/name/config.pbtxt`` and ``repository/name/<v>/model.onnx``."""
    model_dir = Path(repository) / name
    for version in versions:
        (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
        (model_dir / str(version) / filename).write_bytes(model)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return model_dir
