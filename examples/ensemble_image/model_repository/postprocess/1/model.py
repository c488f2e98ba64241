"""Post-processing step of the image_pipeline ensemble, written to Triton's Python-backend API.

Input ``LOGITS`` (FP32 ``[B, 1000]``). Outputs, best first: ``SCORES`` (FP32
``[B, K]``, softmax probabilities), ``CLASS_IDS`` (INT64 ``[B, K]``) and
``LABELS`` (BYTES ``[B, K]``, the names from ``labels.txt`` next to
``config.pbtxt``, one per line). ``K`` is the ``TOP_K`` parameter.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.top_k = int(config.get("parameters", {}).get("TOP_K", {}).get("string_value", "5"))
        labels_path = os.path.join(args["model_repository"], "labels.txt")
        with open(labels_path, encoding="utf-8") as handle:
            self.labels = np.array([line.strip().encode("utf-8") for line in handle if line.strip()], dtype=object)
        classes = config["input"][0]["dims"][-1]
        if len(self.labels) != int(classes):
            raise ValueError(f"{labels_path} has {len(self.labels)} labels, LOGITS has {classes} classes")

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy().astype(np.float32)
            shifted = logits - logits.max(axis=1, keepdims=True)  # numerically stable softmax
            probabilities = np.exp(shifted)
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            # argpartition finds the top K in O(n); only those K are sorted.
            top = np.argpartition(-probabilities, self.top_k - 1, axis=1)[:, : self.top_k]
            order = np.take_along_axis(probabilities, top, axis=1).argsort(axis=1)[:, ::-1]
            class_ids = np.take_along_axis(top, order, axis=1).astype(np.int64)
            scores = np.take_along_axis(probabilities, class_ids, axis=1).astype(np.float32)
            labels = self.labels[class_ids]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("LABELS", labels),
                pb_utils.Tensor("SCORES", scores),
                pb_utils.Tensor("CLASS_IDS", class_ids),
            ]))
        return responses

    def finalize(self):
        pass
