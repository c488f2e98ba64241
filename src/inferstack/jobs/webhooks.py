"""Signed webhook delivery: POST the finished job to its ``callback_url``.

The body is the job's JSON (the same document ``GET /v2/jobs/{id}`` gives,
the v2 response included under ``result``). ``X-Inferstack-Signature:
sha256=<hex>`` is the HMAC-SHA256 of the exact body bytes under the shared
secret (``--webhook-secret`` / ``INFERSTACK_WEBHOOK_SECRET``); receivers
recompute it and compare in constant time (:func:`verify`). The body holds
the job id and ``finished_at``, so a receiver can also refuse replays.

Delivery is retried with exponential backoff on connection errors, timeouts,
408, 429 and 5xx; any other 4xx is final (the receiver refused it). The
outcome (delivered / failed, attempts, last error) is recorded on the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger("inferstack.jobs.webhooks")

SIGNATURE_HEADER = "X-Inferstack-Signature"
JOB_HEADER = "X-Inferstack-Job-Id"
_RETRY_STATUS = {408, 429}


def sign(secret: str | bytes, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """True if ``header`` is the signature of ``body`` (for receivers; constant-time)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


@dataclass(slots=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    error: str = ""


class WebhookSender:
    """Delivers signed callbacks with retries; one shared HTTP client."""

    def __init__(self, secret: str, *, max_attempts: int = 5, timeout: float = 10.0,
                 backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        if not secret:
            raise ValueError("a webhook secret is required to sign callbacks")
        self.secret = secret
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def deliver(self, url: str, job_id: str, body: bytes) -> DeliveryResult:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body), JOB_HEADER: job_id,
                   "User-Agent": "inferstack-webhook"}
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 300:
                    return DeliveryResult(True, attempt)
                error = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code not in _RETRY_STATUS:
                    log.warning("webhook for job %s refused by %s: %s", job_id, url, error)
                    return DeliveryResult(False, attempt, error)
            if attempt < self.max_attempts:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        log.warning("webhook for job %s to %s failed after %d attempts: %s", job_id, url, self.max_attempts, error)
        return DeliveryResult(False, self.max_attempts, error)

    async def close(self) -> None:
        await self._client.aclose()
