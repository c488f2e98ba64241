"""Pre-processing step of the image_pipeline ensemble, written to Triton's Python-backend API.

Input ``IMAGE_BYTES`` (BYTES ``[B, 1]``): an encoded PNG or JPEG per row. Output
``IMAGE`` (FP32 ``[B, 3, 224, 224]``): RGB, shorter side resized to
``RESIZE_SHORTER_SIDE`` (bicubic), centre-cropped to 224x224, scaled to [0, 1]
and normalised with the ImageNet mean and standard deviation (what
torchvision's ResNet-18 expects). A row that is not a decodable image fails
its request with a message; the other requests of the batch are answered.
"""

import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError

import triton_python_backend_utils as pb_utils

CROP = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
# Decompression bombs: refuse images over ~50 megapixels instead of allocating gigabytes.
Image.MAX_IMAGE_PIXELS = 50_000_000


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self.shorter_side = int(parameters.get("RESIZE_SHORTER_SIDE", {}).get("string_value", "256"))
        if self.shorter_side < CROP:
            raise ValueError(f"RESIZE_SHORTER_SIDE must be >= {CROP}, got {self.shorter_side}")

    def _decode(self, data):
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise ValueError(f"expected a PNG or JPEG image, got {image.format}")
            image = image.convert("RGB")
            width, height = image.size
            scale = self.shorter_side / min(width, height)
            size = (max(CROP, round(width * scale)), max(CROP, round(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
            image = image.crop((left, top, left + CROP, top + CROP))
            array = np.asarray(image, dtype=np.float32) / 255.0  # HWC
        return (array.transpose(2, 0, 1) - MEAN) / STD  # CHW, normalised

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "IMAGE_BYTES").as_numpy().reshape(-1)
            try:
                images = np.stack([self._decode(bytes(row)) for row in rows]).astype(np.float32)
            except (UnidentifiedImageError, ValueError, OSError, Image.DecompressionBombError) as exc:
                # INVALID_ARG: the client sent a bad file (HTTP 400), not a server failure.
                error = pb_utils.TritonError(f"IMAGE_BYTES is not a decodable PNG/JPEG image: {exc}",
                                             pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", images)]))
        return responses

    def finalize(self):
        pass
