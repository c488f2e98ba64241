"""Fixtures' building blocks for the LLM tests: a repository with tiny generation and embedding models."""

from __future__ import annotations

from pathlib import Path

from inferstack.testing import llm_models

EMBED_CONFIG = """
name: "%s"
backend: "embedding"
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 1000 }
parameters [ { key: "pooling" value: { string_value: "mean" } } ]
"""


def build_llm_repository(root: Path) -> Path:
    """tiny (continuous, 4 slots), tiny_small_queue (1 slot, 1 waiting), tiny_embed, tiny_vllm."""
    llm_models.write_llm_model(root, "tiny", parameters={
        "max_num_seqs": "4", "max_model_len": "256", "max_num_batched_tokens": "64", "default_max_tokens": "8",
    })
    source = root / "tiny" / "1" / "model"
    # A long context, so that a request can stay running for the whole queue test.
    llm_models.write_llm_model(root, "tiny_small_queue", max_position_embeddings=16384, parameters={
        "max_num_seqs": "1", "max_waiting_requests": "1", "max_model_len": "16384",
    })
    embed_dir = root / "tiny_embed"
    llm_models.tiny_bert_onnx(embed_dir / "1" / "model")
    (embed_dir / "config.pbtxt").write_text(EMBED_CONFIG % "tiny_embed")
    llm_models.write_llm_model(root, "tiny_vllm", backend="vllm", source=source)
    return root
