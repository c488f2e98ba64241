"""Request-side types of the generation engine, importable without torch.

The HTTP and gRPC layers build :class:`SamplingParams` and catch
:class:`QueueFullError` without importing the engine (and so torch): a server
without generation models never pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferstack.core.errors import InvalidArgumentError, UnavailableError


class QueueFullError(UnavailableError):
    """Too many requests wait for a KV-cache slot: 429 with Retry-After, RESOURCE_EXHAUSTED over gRPC."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


@dataclass(slots=True)
class SamplingParams:
    """What a request asks of the sampler and the stop conditions."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    #: How many top alternatives to return per token (None: no logprobs at all).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    def validate(self, prefix: str = "") -> None:
        """Raise InvalidArgumentError naming the offending field."""

        def bad(name: str, why: str) -> None:
            raise InvalidArgumentError(f"{prefix}{name!r} {why}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", f"must be an integer >= -1 (-1 or 0: disabled), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of integers")
        if len(self.stop) > 16:
            bad("stop", f"may hold at most 16 strings, got {len(self.stop)}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20
        ):
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
