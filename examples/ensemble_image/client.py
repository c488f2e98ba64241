"""Send images to the image_pipeline ensemble and print the top-5 labels.

    python examples/ensemble_image/client.py cat.jpg dog.png        # HTTP, localhost:8000
    python examples/ensemble_image/client.py --grpc --url localhost:8001 cat.jpg
    python examples/ensemble_image/client.py                         # a generated test image

All images go in one request (a batch of encoded files, BYTES [N, 1]).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np


def demo_image() -> bytes:
    """A 320x240 PNG gradient, so the example runs without any file."""
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", type=Path)
    parser.add_argument("--url", default=None, help="host:port (default localhost:8000, or :8001 with --grpc)")
    parser.add_argument("--grpc", action="store_true")
    args = parser.parse_args()
    blobs = [path.read_bytes() for path in args.images] or [demo_image()]
    names = [str(path) for path in args.images] or ["<generated gradient>"]
    data = np.array([[blob] for blob in blobs], dtype=object)
    if args.grpc:
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(args.url or ("localhost:8001" if args.grpc else "localhost:8000"))
    tensor = client_module.InferInput("IMAGE_BYTES", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    result = client.infer("image_pipeline", [tensor])
    labels, scores = result.as_numpy("LABELS"), result.as_numpy("SCORES")
    for name, row_labels, row_scores in zip(names, labels, scores):
        print(name)
        for label, score in zip(row_labels, row_scores):
            print(f"  {score:7.4f}  {label.decode()}")


if __name__ == "__main__":
    main()
