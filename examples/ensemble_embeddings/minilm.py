"""A MiniLM-shaped sentence encoder in plain PyTorch (random weights: no download).

The shape of ``all-MiniLM-L6-v2``: 6 transformer layers, hidden size 384, 12 heads,
feed-forward 1536, learned position embeddings, post-layer-norm (BERT style), GELU.
``forward(input_ids, attention_mask)`` returns the last hidden state ``[B, S, 384]``;
padding positions (mask 0) are excluded from attention.
"""

from __future__ import annotations

import math

import torch


class Layer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.norm1 = torch.nn.LayerNorm(hidden, eps=1e-12)
        self.ff1 = torch.nn.Linear(hidden, intermediate)
        self.ff2 = torch.nn.Linear(intermediate, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        head = hidden // self.heads
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, head).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + bias  # bias: 0 or -inf-ish for padding
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class MiniLM(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden: int = 384, layers: int = 6, heads: int = 12,
                 intermediate: int = 1536, max_positions: int = 512) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab_size, hidden)
        self.positions = torch.nn.Embedding(max_positions, hidden)
        self.norm = torch.nn.LayerNorm(hidden, eps=1e-12)
        self.layers = torch.nn.ModuleList(Layer(hidden, heads, intermediate) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9
        for layer in self.layers:
            x = layer(x, bias)
        return x


def build(vocab_size: int, *, seed: int = 0, **sizes: int) -> MiniLM:
    torch.manual_seed(seed)
    model = MiniLM(vocab_size, **sizes).eval()
    with torch.no_grad():  # BERT's initialisation scale keeps activations O(1)
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
    return model


def export(model: MiniLM, path: str, *, max_batch: int = 8, max_length: int = 128) -> None:
    """Save a ``torch.export`` program with dynamic batch and sequence dimensions."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=2, max=max_length)
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    program = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    torch.export.save(program, path)
