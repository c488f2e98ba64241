"""Sampling parameters and the per-step token choice.

Greedy rows (temperature 0) are one batched ``argmax``. Sampled rows each use
their own ``torch.Generator``: seeded from the request's ``seed`` when given,
so a seeded request draws the same tokens however it is batched.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from inferstack.llm.params import SamplingParams

__all__ = ["Choice", "SamplingParams", "make_generator", "sample"]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return generator


@dataclass(slots=True)
class Choice:
    """One sampled token, with its log-probability and the top alternatives when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[Choice]:
    """Choose the next token of every row of ``logits`` ([rows, vocab], float32, CPU)."""
    rows = logits.shape[0]
    tokens = torch.argmax(logits, dim=-1)
    chosen = tokens.tolist()
    for i in range(rows):
        p = params[i]
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    results = [Choice(token) for token in chosen]
    wanted = [i for i in range(rows) if params[i].logprobs is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            row = logprobs[j]
            results[i].logprob = float(row[chosen[i]])
            n = params[i].logprobs or 0
            if n:
                values, indices = torch.topk(row, n)
                results[i].top = list(zip(indices.tolist(), values.tolist()))
            else:
                results[i].top = []
    return results
