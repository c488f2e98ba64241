"""The model forward pass over a fixed pool of KV-cache slots.

Hugging Face's ``generate`` keeps one cache per call; continuous batching needs
sequences at different positions to share a forward pass, join and leave at any
step. So the runner keeps its own static cache — one tensor per layer for keys
and one for values, ``[slots, kv_heads, max_model_len, head_dim]`` — and runs
the decoder layers of the loaded Hugging Face model itself: the model's own
modules (embeddings, projections, norms, MLPs, rotary embedding, LM head) do
the arithmetic, the runner only does the attention against its cache.

One call, :meth:`ModelRunner.forward`, serves prefill, chunked prefill and
decode: each row is a slot, the position its tokens start at and up to
``q_len`` new tokens. New keys and values are written into the slot, then each
query attends to the slot's keys up to its own position. Adding a sequence is
choosing a free slot; removing it is forgetting the slot — no cache is ever
copied or merged.

Supported: decoder-only models with the Llama layout (Llama, Mistral without
sliding window, Qwen2 with q/k/v biases, Qwen3 with q/k norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(Exception):
    """The model's architecture is not one the runner knows how to drive."""


@dataclass(slots=True)
class Row:
    """One slot's share of a forward pass: ``tokens`` start at position ``start``."""

    slot: int
    start: int
    tokens: list[int]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Runs a Llama-style Hugging Face model against a static KV cache of ``slots`` slots."""

    def __init__(self, model: Any, *, slots: int, max_model_len: int, device: torch.device, dtype: torch.dtype) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model type {config.model_type!r} is not supported by the transformers engine; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.model_type == "mistral" and config.sliding_window < max_model_len:
            raise UnsupportedModelError(
                f"sliding window attention ({config.sliding_window}) is not supported; set max_model_len "
                f"<= {config.sliding_window}"
            )
        self.model = model
        self.config = config
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.slots = slots
        self.max_model_len = max_model_len
        self.device = device
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = config.vocab_size
        shape = (slots, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> torch.Tensor:
        """Logits (float32, ``[len(rows), vocab]``) for the last token of each row."""
        device = self.device
        batch = len(rows)
        q_len = max(len(r.tokens) for r in rows)
        ids = torch.zeros((batch, q_len), dtype=torch.long)
        lengths = torch.tensor([len(r.tokens) for r in rows], dtype=torch.long)
        starts = torch.tensor([r.start for r in rows], dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        offsets = torch.arange(q_len, dtype=torch.long)
        positions = starts[:, None] + offsets[None, :]  # [B, Q]
        valid = offsets[None, :] < lengths[:, None]  # [B, Q]
        # Padding positions write nowhere and read position 0: keep them in range.
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        key_len = int((starts + lengths).max())
        keys = torch.arange(key_len, dtype=torch.long)
        # Query at position p sees keys 0..p of its own slot; padding queries see key 0 only.
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, Q, K]
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
        write_slot = slots[:, None].expand(batch, q_len)[valid]
        write_pos = positions[valid]

        # Attention reads the cache in place when the rows' slots lie in a compact span (the
        # common case: a full or nearly full batch): queries are placed at their slot's index
        # in a [span] batch, and rows of the span without a query attend to key 0 only.
        # Otherwise the rows' slots are gathered (a copy of their keys and values).
        lo, hi = min(r.slot for r in rows), max(r.slot for r in rows)
        span = hi - lo + 1
        in_place = span <= 2 * batch
        if in_place:
            row_index = slots - lo
            full_mask = torch.zeros((span, q_len, key_len), dtype=torch.bool)
            full_mask[:, :, 0] = True
            full_mask[row_index] = mask
            mask = full_mask
            row_index = row_index.to(device)
        ids, positions, mask = ids.to(device), positions.to(device), mask.to(device)
        slots, write_slot, write_pos, valid = slots.to(device), write_slot.to(device), write_pos.to(device), valid.to(device)
        attn_mask = mask[:, None, :, :]

        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        cos, sin = cos[:, None, :, :], sin[:, None, :, :]
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(batch, q_len, -1, self.head_dim)
            k = attn.k_proj(x).view(batch, q_len, -1, self.head_dim)
            v = attn.v_proj(x).view(batch, q_len, -1, self.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            # [B, H, Q, D] -> the valid tokens as [T, H, D], written at (slot, :, position).
            k_cache[write_slot, :, write_pos] = k.transpose(1, 2)[valid].to(self.dtype)
            v_cache[write_slot, :, write_pos] = v.transpose(1, 2)[valid].to(self.dtype)
            gqa = self.num_kv_heads != self.num_heads
            if in_place:
                q_all = q.new_zeros((span, *q.shape[1:]))
                q_all[row_index] = q
                out = F.scaled_dot_product_attention(
                    q_all, k_cache[lo:hi + 1, :, :key_len], v_cache[lo:hi + 1, :, :key_len],
                    attn_mask=attn_mask, enable_gqa=gqa,
                )[row_index]
            else:
                out = F.scaled_dot_product_attention(
                    q, k_cache[slots, :, :key_len], v_cache[slots, :, :key_len], attn_mask=attn_mask, enable_gqa=gqa
                )
            out = out.transpose(1, 2).reshape(batch, q_len, -1)
            hidden = residual + attn.o_proj(out)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        last = (lengths - 1).to(device)
        hidden = hidden[torch.arange(batch, device=device), last]
        hidden = self.inner.norm(hidden)
        return self.model.lm_head(hidden).float()
