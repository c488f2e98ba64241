"""Build what the image_pipeline repository cannot ship in git: the CNN and its labels.

    python examples/ensemble_image/generate.py

Writes ``model_repository/resnet18/1/model.onnx`` (a ResNet-18-shaped CNN with
random weights from ``benchmarks/cnn.py``, ~45 MB, built in a few seconds: no
download) and ``model_repository/postprocess/labels.txt`` (1000 class names).
The weights are random, so the predicted labels mean nothing; swap in a real
``model.onnx`` (same input/output names) and its labels for real predictions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))

import cnn


def generate(repository: Path, *, seed: int = 0) -> None:
    model_file = repository / "resnet18" / "1" / "model.onnx"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model = cnn.build_resnet18(seed=seed, fold_bn=True)
    model_file.write_bytes(model.SerializeToString())
    labels = [f"class_{index:03d}" for index in range(cnn.CNN_NUM_CLASSES)]
    (repository / "postprocess" / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE / "model_repository")
    generate(parser.parse_args().repository)
    print("wrote the CNN and labels into", parser.parse_args().repository)
