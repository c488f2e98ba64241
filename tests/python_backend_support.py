"""Model repository for the Python backend tests: Triton-style, typed, failing, crashing and BLS models."""

from __future__ import annotations

import textwrap
from pathlib import Path

from inferstack.testing import onnx_models

# Triton's classic add_sub example, written the way Triton's Python backend docs show it.
ADD_SUB_MODEL = '''
import json

# triton_python_backend_utils is available in every Triton Python model.
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Your Python model must use the same class name. Every Python model
    that is created must have "TritonPythonModel" as the class name.
    """

    def initialize(self, args):
        # You must parse model_config. JSON string is not parsed here
        self.model_config = model_config = json.loads(args["model_config"])

        # Get OUTPUT0 configuration
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")

        # Get OUTPUT1 configuration
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")

        # Convert Triton types to numpy types
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        output0_dtype = self.output0_dtype
        output1_dtype = self.output1_dtype

        responses = []

        # Every Python backend must iterate over everyone of the requests
        # and create a pb_utils.InferenceResponse for each of them.
        for request in requests:
            # Get INPUT0
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            # Get INPUT1
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")

            out_0, out_1 = (
                in_0.as_numpy() + in_1.as_numpy(),
                in_0.as_numpy() - in_1.as_numpy(),
            )

            # Create output tensors. You need pb_utils.Tensor
            # objects to create pb_utils.InferenceResponse.
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(output1_dtype))

            # Create InferenceResponse.
            inference_response = pb_utils.InferenceResponse(
                output_tensors=[out_tensor_0, out_tensor_1]
            )
            responses.append(inference_response)

        # You should return a list of pb_utils.InferenceResponse. Length
        # of this list must match the length of `requests` list.
        return responses

    def finalize(self):
        """`finalize` is called only once when the model is being unloaded."""
        print("Cleaning up...")
'''

ADD_SUB_CONFIG = '''
name: "py_add_sub"
backend: "python"

input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]

instance_group [{ kind: KIND_CPU }]
'''

# A batching Triton-style model that reports how many requests each execute() saw,
# echoes request ids / parameters, fails requests on demand and crashes on demand.
BATCHED_MODEL = '''
import ctypes
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.config = json.loads(args["model_config"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            params = json.loads(request.parameters())
            if params.get("crash") == "segfault":
                ctypes.string_at(0)  # SIGSEGV
            if params.get("crash") == "exit":
                os._exit(3)
            if params.get("sleep"):
                time.sleep(float(params["sleep"]))
            if float(x.reshape(-1)[0]) < 0:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)))
                continue
            if params.get("wrong_dtype"):
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("Y", x.astype(np.float64)),
                    pb_utils.Tensor("INFO", np.array([[b"x"]] * x.shape[0], dtype=np.object_))]))
                continue
            if params.get("raise"):
                raise pb_utils.TritonModelException("asked to raise")
            rows = x.shape[0]
            info = {"batch_requests": len(requests), "id": request.request_id(),
                    "pid": os.getpid(), "instance": self.args["model_instance_name"],
                    "kind": self.args["model_instance_kind"], "version": self.args["model_version"],
                    "repository": self.args["model_repository"], "model_dir": pb_utils.get_model_dir(),
                    "requested": request.requested_output_names()}
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", (x * 2).astype(np.float32)),
                pb_utils.Tensor("INFO", np.array([json.dumps(info).encode()] * rows, dtype=np.object_).reshape(rows, 1)),
            ]))
        return responses
'''

BATCHED_CONFIG = '''
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
'''

TYPED_MODEL = '''
import numpy as np

from inferstack.python_backend import InputError, PythonModel


class Scale(PythonModel):
    def load(self, context):
        self.factor = float(context.parameters.get("factor", "1"))
        self.calls = 0

    def predict(self, inputs):
        x = inputs["X"]
        if np.isnan(x).any():
            raise InputError("X must not contain NaN")
        if (x > 1e6).any():
            raise RuntimeError("value too large for this model")
        self.calls += 1
        rows = x.shape[0]
        return {"Y": x * self.factor, "ROWS": np.full((rows, 1), rows, dtype=np.int64)}
'''

TYPED_CONFIG = '''
backend: "python"
max_batch_size: 16
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] },
         { name: "ROWS" data_type: TYPE_INT64 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
parameters { key: "factor" value: { string_value: "3" } }
'''

# BLS: calls the ONNX add_sub model (16 floats) and the Python add_sub, combines the results.
BLS_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "A")
            b = pb_utils.get_input_tensor_by_name(request, "B")
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy().reshape(-1)[0].decode()
            infer_request = pb_utils.InferenceRequest(
                model_name=target,
                requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.Tensor("INPUT0", a.as_numpy()), pb_utils.Tensor("INPUT1", b.as_numpy())],
            )
            infer_response = infer_request.exec()
            if infer_response.has_error():
                raise pb_utils.TritonModelException(infer_response.error().message())
            out0 = pb_utils.get_output_tensor_by_name(infer_response, "OUTPUT0").as_numpy()
            out1 = pb_utils.get_output_tensor_by_name(infer_response, "OUTPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", out0 + out1)]))
        return responses
'''

# The same with `async def execute` and async_exec(), both as Triton documents them.
ASYNC_BLS_MODEL = BLS_MODEL.replace("    def execute(self, requests):", "    async def execute(self, requests):").replace(
    "infer_response = infer_request.exec()", "infer_response = await infer_request.async_exec()")

BLS_CONFIG = '''
backend: "python"
input [ { name: "A" data_type: TYPE_FP32 dims: [ 1, 16 ] },
        { name: "B" data_type: TYPE_FP32 dims: [ 1, 16 ] },
        { name: "TARGET" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 1, 16 ] } ]
'''

ONNX_ADD_SUB_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
"""

ENV_MODEL = '''
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        prefix = np.array([sys.prefix.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PREFIX", prefix)]) for _ in requests]
'''

ENV_CONFIG = '''
backend: "python"
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "PREFIX" data_type: TYPE_STRING dims: [ 1 ] } ]
parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "%s" } }
'''


def write_python_model(root: Path, name: str, source: str, config: str, version: int = 1) -> Path:
    model_dir = root / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / str(version) / "model.py").write_text(textwrap.dedent(source).lstrip())
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def build_python_repository(root: Path) -> Path:
    write_python_model(root, "py_add_sub", ADD_SUB_MODEL, ADD_SUB_CONFIG)
    write_python_model(root, "py_batched", BATCHED_MODEL, BATCHED_CONFIG)
    write_python_model(root, "py_typed", TYPED_MODEL, TYPED_CONFIG)
    write_python_model(root, "py_bls", BLS_MODEL, BLS_CONFIG)
    write_python_model(root, "py_bls_async", ASYNC_BLS_MODEL, BLS_CONFIG)
    onnx_models.write_model(root, "onnx_add_sub", onnx_models.add_sub(16), ONNX_ADD_SUB_CONFIG)
    return root
