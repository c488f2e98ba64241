"""What a job is, independent of where it is queued.

A job is one v2 inference request run later: the request body is stored
once (``Payload``), the job's state lives in a small record (``JobRecord``)
and the v2 response, when there is one, is stored apart with a TTL. The
in-process queue and the Redis Streams queue hold exactly these, so the HTTP
handlers, the worker and the tests see one shape whatever the backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from inferstack.core.errors import InferenceServerError


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Finished, and the result's TTL has passed: the record says so, the result is gone.
    EXPIRED = "expired"


#: States a job never leaves (expired is derived from these plus the clock).
FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Outcomes counted by ``jobs by outcome`` (``inferstack_jobs_total{outcome}``).
OUTCOMES = ("succeeded", "failed", "cancelled", "dead_lettered")


class ConflictError(InferenceServerError):
    """The job is not in a state that allows the operation (cancel a running job)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


@dataclass(slots=True)
class Payload:
    """The request as the client sent it (JSON header plus optional binary tensors)."""

    body: bytes
    #: ``Inference-Header-Content-Length`` when binary tensor data follows the JSON.
    header_length: int | None = None


@dataclass(slots=True)
class JobSpec:
    """Everything needed to run a job, fixed at submission."""

    model: str
    version: str = ""
    callback_url: str | None = None
    request_id: str = ""
    #: The client's ``Idempotency-Key``: submitting again with it returns the first job.
    idempotency_key: str = ""


@dataclass(slots=True)
class JobRecord:
    """A job's state as ``GET /v2/jobs/{id}`` reports it (the result aside)."""

    id: str
    model: str
    version: str = ""
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    #: Executions started (claims); more than one means a worker died or a retry.
    attempts: int = 0
    #: Why it failed (the final error), or the last retryable error while retrying.
    error: str = ""
    #: HTTP status of the error (400 bad request, 500 internal ...), when failed.
    error_status: int | None = None
    callback_url: str | None = None
    #: pending | delivered | failed; empty without a callback.
    webhook_status: str = ""
    webhook_attempts: int = 0
    webhook_error: str = ""
    #: Times the final result was written: exactly one for every finished job.
    result_writes: int = 0
    #: Seconds the result is kept after the job finishes.
    result_ttl: float = 3600.0
    request_id: str = ""

    def visible_status(self, now: float | None = None) -> JobStatus:
        """The status with expiry applied: a finished job past its TTL reads ``expired``."""
        now = now if now is not None else time.time()
        if self.status in FINAL and self.finished_at is not None and now >= self.finished_at + self.result_ttl:
            return JobStatus.EXPIRED
        return self.status

    def as_dict(self, now: float | None = None, *, expired: bool = False) -> dict[str, Any]:
        """The job as JSON; ``expired`` when the store has already dropped the result."""
        status = JobStatus.EXPIRED if expired else self.visible_status(now)
        out: dict[str, Any] = {
            "id": self.id,
            "model_name": self.model,
            "model_version": self.version,
            "status": status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "attempts": self.attempts,
        }
        if self.finished_at is not None:
            out["expires_at"] = self.finished_at + self.result_ttl
        if self.error:
            out["error"] = self.error
        if self.callback_url:
            out["webhook"] = {
                "url": self.callback_url,
                "status": self.webhook_status or "pending",
                "attempts": self.webhook_attempts,
                **({"error": self.webhook_error} if self.webhook_error else {}),
            }
        return out


@dataclass(slots=True)
class Claim:
    """A job handed to one worker: its record, its payload and the queue's delivery token."""

    record: JobRecord
    payload: Payload
    #: Backend-specific delivery handle (the stream entry id for Redis).
    token: str = ""
    #: The job already finished; only its webhook is left to deliver (its worker died first).
    webhook_only: bool = False


@dataclass(slots=True)
class Outcome:
    """How an execution ended, as the worker reports it to ``complete``."""

    status: JobStatus  # SUCCEEDED or FAILED
    #: The v2 inference response (JSON bytes) when it succeeded.
    result: bytes = b""
    error: str = ""
    error_status: int | None = None


@dataclass(slots=True)
class QueueStats:
    """The numbers autoscaling and dashboards need, read at one moment."""

    #: Jobs waiting for a worker (not yet delivered to any).
    queued: int
    #: Jobs delivered to a worker and not acknowledged (running, or held by a dead worker).
    pending: int
    #: Age in seconds of the oldest job not finished (queued or pending); 0 when none.
    oldest_age: float
    #: Jobs finished, by outcome (cluster-wide for Redis).
    outcomes: dict[str, int]
    dead_letters: int = 0
