"""Retry budget and per-replica circuit breaker.

Retries hide a replica dying under load, but unbounded retries turn an
overload into a retry storm. The budget lets retries add at most ``ratio`` of
the recent request rate (plus a small floor so a quiet gateway can still
retry). The breaker stops sending to a replica that keeps failing: it opens on
``failures`` consecutive failures or on an error rate above ``error_rate``
over the last window, stays open for ``open_s``, then lets one probe through
(half-open); the probe's success closes it, its failure opens it again.
"""

from __future__ import annotations

import time

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class RetryBudget:
    """Sliding 10 s window: retries allowed while retries <= min_per_s*10 + ratio*requests."""

    WINDOW = 10.0

    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0) -> None:
        self.ratio = ratio
        self.min_retries = min_per_s * self.WINDOW
        self._slot = 0
        self._requests = [0] * 10
        self._retries = [0] * 10

    def _advance(self) -> None:
        slot = int(time.monotonic())
        if slot != self._slot:
            gap = min(10, slot - self._slot) if self._slot else 10
            for i in range(1, gap + 1):
                j = (self._slot + i) % 10
                self._requests[j] = 0
                self._retries[j] = 0
            self._slot = slot

    def record_request(self) -> None:
        self._advance()
        self._requests[self._slot % 10] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        self._advance()
        if sum(self._retries) + 1 > self.min_retries + self.ratio * sum(self._requests):
            return False
        self._retries[self._slot % 10] += 1
        return True


class CircuitBreaker:
    def __init__(self, failures: int = 5, error_rate: float = 0.5, min_requests: int = 20,
                 open_s: float = 5.0) -> None:
        self.failures = failures
        self.error_rate = error_rate
        self.min_requests = min_requests
        self.open_s = open_s
        self.state = CLOSED
        self.consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._window_start = time.monotonic()
        self._ok = 0
        self._bad = 0
        #: times the breaker opened (exported as a metric)
        self.opened_total = 0

    def allow(self) -> bool:
        """May a request go to this replica now? Moves OPEN -> HALF_OPEN after open_s."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if time.monotonic() - self._opened_at < self.open_s:
                return False
            self.state = HALF_OPEN
            self._probe_in_flight = False
        return not self._probe_in_flight

    def on_attempt(self) -> None:
        if self.state == HALF_OPEN:
            self._probe_in_flight = True

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._window_start > 10.0:
            self._window_start = now
            self._ok = self._bad = 0

    def on_success(self) -> None:
        self._roll()
        self._ok += 1
        self.consecutive = 0
        if self.state == HALF_OPEN:  # the probe worked (a late answer while OPEN proves nothing)
            self.state = CLOSED
            self._probe_in_flight = False

    def on_failure(self) -> None:
        self._roll()
        self._bad += 1
        self.consecutive += 1
        if self.state == OPEN:
            return
        if self.state == HALF_OPEN:
            self._open()
            return
        total = self._ok + self._bad
        if self.consecutive >= self.failures or (
            total >= self.min_requests and self._bad / total > self.error_rate
        ):
            self._open()

    def _open(self) -> None:
        self.state = OPEN
        self._opened_at = time.monotonic()
        self._probe_in_flight = False
        self.opened_total += 1
        self._ok = self._bad = 0

    def reset(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self._probe_in_flight = False
