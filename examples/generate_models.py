"""Regenerate the example model repository (``examples/model_repository``).

    python examples/generate_models.py            # writes next to this file

The models are tiny and deterministic (fixed seeds), so the committed files
only change when this script does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from inferstack.testing import onnx_models

MLP_CONFIG = """\
# A two-layer perceptron: 64 features in, 10 logits out.
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] }
]
dynamic_batching {
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 1024 }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ADD_SUB_CONFIG = """\
# Triton's classic example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.
name: "add_sub"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
"""


def generate(repository: Path) -> None:
    onnx_models.write_model(repository, "mlp", onnx_models.mlp(), MLP_CONFIG)
    onnx_models.write_model(repository, "add_sub", onnx_models.add_sub(16), ADD_SUB_CONFIG)
    # No config.pbtxt: the server completes it from the ONNX graph.
    onnx_models.write_model(repository, "identity_bytes", onnx_models.identity("BYTES"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model_repository")
    generate(parser.parse_args().out)
