"""Pooling step of the embeddings ensemble (Triton Python-backend API).

Sentence-transformers' mean pooling: the average of the token embeddings where
``ATTENTION_MASK`` is 1 (padding excluded), then divided by its L2 norm so the
dot product of two embeddings is their cosine similarity.
"""

import numpy as np

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKEN_EMBEDDINGS").as_numpy()
            mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy().astype(np.float32)
            summed = (tokens * mask[:, :, None]).sum(axis=1)
            mean = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
            norm = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
            embedding = (mean / norm).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", embedding)]))
        return responses

    def finalize(self):
        pass
