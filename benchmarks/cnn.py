"""Build the benchmark models with the ``onnx`` helper API (no torch, no downloads).

* :func:`build_resnet18` -- a ResNet-18-shaped CNN with random (He-initialised)
  weights: conv7x7/2 + BN + ReLU + maxpool3x3/2, four stages of two basic blocks
  (64/128/256/512 channels; the first block of stages 2-4 is strided and has a
  1x1/2 conv + BN shortcut), global average pool, flatten, FC 1000.
  Input ``INPUT0`` FP32 ``[B,3,224,224]`` (dynamic batch), output ``OUTPUT0``
  FP32 ``[B,1000]``.  ~11.7 M parameters, ~1.8 GFLOP per image.
* :func:`build_mlp` -- ``INPUT0`` FP32 ``[B,64]`` -> Gemm 64x256 + Relu -> Gemm
  256x10 -> ``OUTPUT0`` FP32 ``[B,10]``.

:func:`write_model_repository` writes both into a Triton-layout model repository
(``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx``).

Run directly to build a repository::

    python benchmarks/cnn.py /tmp/bench-repo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset / IR version understood by every onnxruntime >= 1.18.
OPSET = 17
IR_VERSION = 9

CNN_INPUT_SHAPE = (3, 224, 224)
CNN_NUM_CLASSES = 1000
MLP_IN, MLP_HIDDEN, MLP_OUT = 64, 256, 10


class _GraphBuilder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    # -- layers ---------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, gain: float = 1.0, bias: bool = False) -> str:
        std = gain * np.sqrt(2.0 / (cin * k * k))  # He init keeps activations O(1)
        w = self.const("conv_w", self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * std)
        inputs = [x, w]
        if bias:
            inputs.append(self.const("conv_b", np.zeros(cout, np.float32)))
        pad = k // 2
        return self.node("Conv", inputs, "conv", kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def bn(self, x: str, c: int) -> str:
        scale = self.const("bn_scale", 1.0 + 0.05 * self.rng.standard_normal(c, dtype=np.float32))
        b = self.const("bn_bias", 0.05 * self.rng.standard_normal(c, dtype=np.float32))
        mean = self.const("bn_mean", 0.05 * self.rng.standard_normal(c, dtype=np.float32))
        var = self.const("bn_var", 1.0 + 0.05 * np.abs(self.rng.standard_normal(c, dtype=np.float32)))
        return self.node("BatchNormalization", [x, scale, b, mean, var], "bn", epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, fold_bn: bool, gain: float = 1.0) -> str:
        if fold_bn:  # BN folded into the conv: conv with bias
            return self.conv(x, cin, cout, k, stride, gain=gain, bias=True)
        return self.bn(self.conv(x, cin, cout, k, stride, gain=gain), cout)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def basic_block(self, x: str, cin: int, cout: int, stride: int, fold_bn: bool) -> str:
        y = self.relu(self.conv_bn(x, cin, cout, 3, stride, fold_bn))
        # Damp the residual branch so the random net stays numerically tame.
        y = self.conv_bn(y, cout, cout, 3, 1, fold_bn, gain=0.5)
        if stride != 1 or cin != cout:
            x = self.conv_bn(x, cin, cout, 1, stride, fold_bn)
        return self.relu(self.node("Add", [y, x], "add"))


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferstack-bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_resnet18(seed: int = 0, fold_bn: bool = False, num_classes: int = CNN_NUM_CLASSES) -> onnx.ModelProto:
    """ResNet-18-shaped CNN with random weights; dynamic batch dimension."""
    g = _GraphBuilder(seed)
    x = g.relu(g.conv_bn("INPUT0", 3, 64, 7, 2, fold_bn))
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = g.basic_block(x, cin, cout, stride, fold_bn)
            cin = cout
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_w = g.const("fc_w", g.rng.standard_normal((num_classes, 512), dtype=np.float32) * np.sqrt(1.0 / 512))
    fc_b = g.const("fc_b", np.zeros(num_classes, np.float32))
    g.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], ["OUTPUT0"], name="fc", transB=1))
    graph = helper.make_graph(
        g.nodes,
        "resnet18_random",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", *CNN_INPUT_SHAPE])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", num_classes])],
        g.initializers,
    )
    return _make_model(graph)


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    """INPUT0 [B,64] -> Gemm(64x256)+Relu -> Gemm(256x10) -> OUTPUT0 [B,10]."""
    g = _GraphBuilder(seed)
    w1 = g.const("w1", g.rng.standard_normal((MLP_IN, MLP_HIDDEN), dtype=np.float32) * np.sqrt(2.0 / MLP_IN))
    b1 = g.const("b1", 0.01 * g.rng.standard_normal(MLP_HIDDEN, dtype=np.float32))
    w2 = g.const("w2", g.rng.standard_normal((MLP_HIDDEN, MLP_OUT), dtype=np.float32) * np.sqrt(1.0 / MLP_HIDDEN))
    b2 = g.const("b2", 0.01 * g.rng.standard_normal(MLP_OUT, dtype=np.float32))
    h = g.node("Gemm", ["INPUT0", w1, b1], "fc1")
    h = g.relu(h)
    g.nodes.append(helper.make_node("Gemm", [h, w2, b2], ["OUTPUT0"], name="fc2"))
    graph = helper.make_graph(
        g.nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", MLP_IN])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", MLP_OUT])],
        g.initializers,
    )
    return _make_model(graph)


def config_pbtxt(name: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...], max_batch_size: int) -> str:
    """Triton ``config.pbtxt``: dims exclude the batch dimension."""

    def dims(d: tuple[int, ...]) -> str:
        return "[ " + ", ".join(str(v) for v in d) + " ]"

    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: {dims(in_dims)}
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: {dims(out_dims)}
  }}
]
dynamic_batching {{ }}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""


# name -> (builder, input dims w/o batch, output dims w/o batch, default max_batch_size)
MODELS = {
    "cnn": (build_resnet18, CNN_INPUT_SHAPE, (CNN_NUM_CLASSES,), 16),
    "mlp": (build_mlp, (MLP_IN,), (MLP_OUT,), 64),
}


def write_model(repo: str | os.PathLike, name: str, max_batch_size: int | None = None, seed: int = 0, **build_kwargs) -> Path:
    """Write ``<repo>/<name>/1/model.onnx`` and ``<repo>/<name>/config.pbtxt``; returns the model path."""
    builder, in_dims, out_dims, default_mbs = MODELS[name]
    model = builder(seed=seed, **build_kwargs)
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    path = model_dir / "1" / "model.onnx"
    onnx.save_model(model, str(path))
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(name, in_dims, out_dims, default_mbs if max_batch_size is None else max_batch_size)
    )
    return path


def write_model_repository(repo: str | os.PathLike, names=("cnn", "mlp"), max_batch_sizes: dict | None = None) -> dict[str, Path]:
    max_batch_sizes = max_batch_sizes or {}
    return {n: write_model(repo, n, max_batch_sizes.get(n)) for n in names}


def check_runs(path: str | os.PathLike, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> np.ndarray:
    """Run the model once in onnxruntime; check the output shape and that it is finite."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(input_shape, dtype=np.float32)
    (y,) = sess.run(["OUTPUT0"], {"INPUT0": x})
    if y.shape != output_shape:
        raise AssertionError(f"{path}: output shape {y.shape}, expected {output_shape}")
    if not np.isfinite(y).all():
        raise AssertionError(f"{path}: non-finite output")
    return y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="model repository directory to (over)write")
    ap.add_argument("--models", default="cnn,mlp")
    ap.add_argument("--cnn-max-batch-size", type=int, default=16)
    ap.add_argument("--mlp-max-batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    paths = write_model_repository(args.repo, names, {"cnn": args.cnn_max_batch_size, "mlp": args.mlp_max_batch_size})
    for name, path in paths.items():
        _, in_dims, out_dims, _ = MODELS[name]
        y = check_runs(path, (2, *in_dims), (2, *out_dims))
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB), ORT output {y.shape} std={y.std():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
