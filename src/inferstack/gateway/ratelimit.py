"""Token buckets per credential and per model -> 429 with Retry-After.

A bucket holds up to ``burst`` tokens and refills at ``rps`` per second; a
request takes one. When a bucket is empty the answer says how long until the
next token (Retry-After, whole seconds, at least 1).
"""

from __future__ import annotations

import math
import time

from inferstack.gateway.auth import Principal
from inferstack.gateway.config import Bucket, GatewayConfig


class TokenBucket:
    __slots__ = ("burst", "rps", "stamp", "tokens")

    def __init__(self, rps: float, burst: float) -> None:
        self.rps = rps
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rps)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rps


class RateLimited(Exception):
    def __init__(self, scope: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.scope = scope
        self.message = message
        self.retry_after = max(1, math.ceil(retry_after))


class RateLimiter:
    def __init__(self, config: GatewayConfig) -> None:
        self._key_default: Bucket | None = config.key_rate
        self._model_limits = dict(config.model_rates)
        self._keys: dict[str, TokenBucket] = {}
        self._models: dict[str, TokenBucket] = {}
        self.enabled = bool(self._key_default or self._model_limits or any(k.rps for k in config.api_keys))

    def check(self, principal: Principal, client: str, model: str) -> None:
        """Raise RateLimited when the caller's or the model's bucket is empty."""
        if not self.enabled:
            return
        identity = principal.name if principal.name != "anonymous" else f"ip:{client}"
        bucket = self._keys.get(identity)
        if bucket is None:
            if principal.rps:
                bucket = TokenBucket(principal.rps, principal.burst or principal.rps)
            elif self._key_default is not None:
                bucket = TokenBucket(self._key_default.rps, self._key_default.burst)
            if bucket is not None:
                if len(self._keys) > 100_000:
                    self._keys.clear()  # bounded memory under a flood of distinct anonymous clients
                self._keys[identity] = bucket
        if bucket is not None:
            wait = bucket.take()
            if wait:
                raise RateLimited("key", f"rate limit of '{identity}' exceeded ({bucket.rps:g}/s)", wait)
        limit = self._model_limits.get(model)
        if limit is not None:
            mbucket = self._models.get(model)
            if mbucket is None:
                mbucket = self._models[model] = TokenBucket(limit.rps, limit.burst)
            wait = mbucket.take()
            if wait:
                raise RateLimited("model", f"rate limit of model '{model}' exceeded ({limit.rps:g}/s)", wait)
