"""The job queue interface and the in-process queue (the default without Redis).

Both implementations give the same guarantees, so ``inferstack serve`` alone
behaves like a server with Redis and workers, only not durable:

- a job is claimed by one worker at a time; a claim not heartbeaten within
  the visibility timeout is taken back and run again (at-least-once);
- the final state (result or failure) is written exactly once: a second
  completion of the same job is refused and only counted;
- a job that has been claimed ``max_attempts`` times without finishing, or
  whose retryable failures used up its attempts, fails with the reason and is
  dead-lettered;
- results are kept ``result_ttl`` seconds after the job finishes; after that
  the job reads ``expired`` for ``record_retention`` more seconds, then is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from inferstack.core.errors import NotFoundError, UnavailableError
from inferstack.jobs.types import (
    FINAL,
    Claim,
    ConflictError,
    JobRecord,
    JobSpec,
    JobStatus,
    Outcome,
    Payload,
    QueueStats,
)


@dataclass(slots=True)
class QueueSettings:
    """Behaviour shared by every queue backend (``--job-*`` flags)."""

    #: Seconds a finished job's result is kept.
    result_ttl: float = 3600.0
    #: Seconds an expired job still answers ``expired`` (instead of 404).
    record_retention: float = 3600.0
    #: Executions (claims) a job gets before it is failed and dead-lettered.
    max_attempts: int = 3
    #: Seconds without a heartbeat after which a claimed job is given to another worker.
    visibility_timeout: float = 60.0
    #: Jobs waiting at most (in-process queue); beyond it submissions get 503.
    max_queued: int = 10000
    extra: dict[str, Any] = field(default_factory=dict)


class JobQueue(Protocol):
    """What the HTTP handlers and workers need from a queue backend."""

    settings: QueueSettings

    async def submit(self, spec: JobSpec, payload: Payload) -> JobRecord: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def result(self, job_id: str) -> bytes | None: ...

    async def cancel(self, job_id: str) -> JobRecord: ...

    async def claim(self, consumer: str, block: float) -> Claim | None: ...

    async def heartbeat(self, claim: Claim, consumer: str) -> None: ...

    async def complete(self, claim: Claim, outcome: Outcome) -> bool: ...

    async def retry(self, claim: Claim, error: str) -> JobRecord: ...

    async def ack(self, claim: Claim) -> None: ...

    async def set_webhook(self, job_id: str, status: str, attempts: int, error: str) -> None: ...

    async def stats(self) -> QueueStats: ...

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


def new_job_id() -> str:
    return uuid.uuid4().hex


def idempotency_digest(spec: JobSpec) -> str:
    """An Idempotency-Key is scoped to the model and version it was sent for."""
    return hashlib.sha256(f"{spec.model}\0{spec.version}\0{spec.idempotency_key}".encode()).hexdigest()


def exhausted_reason(attempts: int, last_error: str) -> str:
    why = last_error or "the worker running it was lost (no heartbeat within the visibility timeout)"
    return f"gave up after {attempts} attempt(s): {why}"


@dataclass(slots=True)
class _Entry:
    record: JobRecord
    payload: Payload | None
    result: bytes | None = None
    #: The claim currently allowed to run it, and when it last proved alive.
    token: str = ""
    heartbeat: float = 0.0
    last_error: str = ""
    #: The Idempotency-Key digest that maps to this job, if any.
    idempotency: str = ""


class InProcessJobQueue:
    """Jobs in this process's memory, run by the server's own workers; lost on restart."""

    def __init__(self, settings: QueueSettings | None = None) -> None:
        self.settings = settings or QueueSettings()
        self._jobs: OrderedDict[str, _Entry] = OrderedDict()
        self._waiting: deque[str] = deque()
        self._running: dict[str, _Entry] = {}
        self._ready = asyncio.Condition()
        self._tokens = 0
        self._outcomes: Counter[str] = Counter()
        self._dead: deque[dict[str, Any]] = deque(maxlen=10000)
        self._dead_total = 0
        #: Idempotency-Key digest -> job id (dropped with the job).
        self._idempotency: dict[str, str] = {}
        #: Completions refused because the job had already finished (a retried run losing the race).
        self.duplicate_completions = 0

    # -- clients --------------------------------------------------------------------

    async def submit(self, spec: JobSpec, payload: Payload) -> JobRecord:
        self._sweep()
        digest = idempotency_digest(spec) if spec.idempotency_key else ""
        if digest:
            existing = self._idempotency.get(digest)
            entry = self._jobs.get(existing) if existing else None
            if entry is not None and not self._gone(entry):
                return _copy(entry.record)
        if len(self._waiting) >= self.settings.max_queued:
            raise UnavailableError(
                f"the job queue is full ({self.settings.max_queued} jobs waiting)", retry_after=1.0
            )
        record = JobRecord(
            id=new_job_id(), model=spec.model, version=spec.version, callback_url=spec.callback_url,
            result_ttl=self.settings.result_ttl, request_id=spec.request_id,
            webhook_status="pending" if spec.callback_url else "",
        )
        self._jobs[record.id] = _Entry(record, payload, idempotency=digest)
        if digest:
            self._idempotency[digest] = record.id
        async with self._ready:
            self._waiting.append(record.id)
            self._ready.notify()
        return _copy(record)

    async def get(self, job_id: str) -> JobRecord | None:
        entry = self._jobs.get(job_id)
        if entry is None or self._gone(entry):
            return None
        return _copy(entry.record)

    async def result(self, job_id: str) -> bytes | None:
        entry = self._jobs.get(job_id)
        if entry is None or entry.record.visible_status() is JobStatus.EXPIRED:
            return None
        return entry.result

    async def cancel(self, job_id: str) -> JobRecord:
        entry = self._jobs.get(job_id)
        if entry is None or self._gone(entry):
            raise NotFoundError(f"unknown job {job_id!r}")
        record = entry.record
        if record.status is not JobStatus.QUEUED:
            raise ConflictError(f"job {job_id!r} is {record.visible_status().value}; only a queued job can be cancelled")
        record.status = JobStatus.CANCELLED
        record.finished_at = time.time()
        entry.payload = None
        self._outcomes["cancelled"] += 1
        try:
            self._waiting.remove(job_id)
        except ValueError:
            pass
        return _copy(record)

    # -- workers --------------------------------------------------------------------

    async def claim(self, consumer: str, block: float) -> Claim | None:
        self._reclaim_stale()
        deadline = time.monotonic() + block
        async with self._ready:
            while not self._waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._ready.wait(), remaining)
                except TimeoutError:
                    return None
            job_id = self._waiting.popleft()
        entry = self._jobs.get(job_id)
        if entry is None or entry.record.status in FINAL or entry.payload is None:
            return None
        record = entry.record
        if record.attempts >= self.settings.max_attempts:
            self._dead_letter(entry, exhausted_reason(record.attempts, entry.last_error))
            return Claim(_copy(record), Payload(b""), "")
        self._tokens += 1
        entry.token = f"{consumer}:{self._tokens}"
        entry.heartbeat = time.monotonic()
        record.status = JobStatus.RUNNING
        record.started_at = time.time()
        record.attempts += 1
        self._running[job_id] = entry
        return Claim(_copy(record), entry.payload, entry.token)

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        entry = self._jobs.get(claim.record.id)
        if entry is not None and entry.record.status is JobStatus.RUNNING:
            entry.token = claim.token  # like XCLAIM: the live worker takes it back
            entry.heartbeat = time.monotonic()
            self._running[claim.record.id] = entry

    async def complete(self, claim: Claim, outcome: Outcome) -> bool:
        entry = self._jobs.get(claim.record.id)
        if entry is None or entry.record.status in FINAL:
            self.duplicate_completions += 1
            return False
        self._finish(entry, outcome.status, outcome.error, outcome.error_status)
        if outcome.status is JobStatus.SUCCEEDED:
            entry.result = outcome.result
        claim.record = _copy(entry.record)
        return True

    async def retry(self, claim: Claim, error: str) -> JobRecord:
        entry = self._jobs.get(claim.record.id)
        if entry is None or entry.record.status in FINAL:
            return claim.record
        entry.last_error = error
        entry.record.error = error
        self._running.pop(claim.record.id, None)
        if entry.record.attempts >= self.settings.max_attempts:
            self._dead_letter(entry, exhausted_reason(entry.record.attempts, error))
        else:
            entry.record.status = JobStatus.QUEUED
            async with self._ready:
                self._waiting.append(claim.record.id)
                self._ready.notify()
        return _copy(entry.record)

    async def ack(self, claim: Claim) -> None:
        """Nothing to release: a finished job is never handed out again here."""

    async def set_webhook(self, job_id: str, status: str, attempts: int, error: str) -> None:
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry.record.webhook_status = status
            entry.record.webhook_attempts = attempts
            entry.record.webhook_error = error

    async def stats(self) -> QueueStats:
        now = time.time()
        unfinished = [self._jobs[i].record.created_at for i in self._waiting if i in self._jobs]
        unfinished += [e.record.created_at for e in self._running.values() if e.record.status is JobStatus.RUNNING]
        return QueueStats(
            queued=len(self._waiting),
            pending=sum(1 for e in self._running.values() if e.record.status is JobStatus.RUNNING),
            oldest_age=max(0.0, now - min(unfinished)) if unfinished else 0.0,
            outcomes=dict(self._outcomes),
            dead_letters=self._dead_total,
        )

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        return list(self._dead)[-count:]

    async def close(self) -> None:
        pass

    # -- internals ------------------------------------------------------------------

    def _finish(self, entry: _Entry, status: JobStatus, error: str, error_status: int | None) -> None:
        record = entry.record
        record.status = status
        record.finished_at = time.time()
        record.error = error
        record.error_status = error_status
        record.result_writes += 1
        entry.payload = None
        self._running.pop(record.id, None)
        self._outcomes[status.value] += 1

    def _dead_letter(self, entry: _Entry, reason: str) -> None:
        self._finish(entry, JobStatus.FAILED, reason, 500)
        self._outcomes["dead_lettered"] += 1
        self._dead_total += 1
        record = entry.record
        self._dead.append({"id": record.id, "model": record.model, "version": record.version,
                           "attempts": record.attempts, "reason": reason, "at": record.finished_at})

    def _reclaim_stale(self) -> None:
        """Claims whose worker stopped heartbeating go back to the queue (or to the dead letters)."""
        limit = time.monotonic() - self.settings.visibility_timeout
        for job_id, entry in list(self._running.items()):
            if entry.record.status is not JobStatus.RUNNING:
                self._running.pop(job_id, None)
            elif entry.heartbeat < limit:
                self._running.pop(job_id, None)
                entry.record.status = JobStatus.QUEUED
                self._waiting.append(job_id)

    def _gone(self, entry: _Entry) -> bool:
        record = entry.record
        return (record.finished_at is not None
                and time.time() >= record.finished_at + record.result_ttl + self.settings.record_retention)

    def _sweep(self) -> None:
        """Forget jobs past their retention (oldest first; stops at the first one still kept)."""
        for job_id in list(self._jobs)[:256]:
            entry = self._jobs[job_id]
            if self._gone(entry):
                del self._jobs[job_id]
                if entry.idempotency:
                    self._idempotency.pop(entry.idempotency, None)
            elif entry.record.finished_at is None:
                continue


def _copy(record: JobRecord) -> JobRecord:
    return JobRecord(**{name: getattr(record, name) for name in JobRecord.__slots__})
