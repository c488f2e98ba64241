"""Running a job's request: in this process's models, or on a server over HTTP.

Errors are sorted into final ones (the request itself is wrong: 4xx, the
job fails at once with the message) and retryable ones (the model is not
ready, the queue is full, a backend or network error: the job is retried
and dead-lettered once its attempts are used up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import httpx
import orjson

from inferstack.core.errors import InferenceServerError
from inferstack.jobs import payload as payloads
from inferstack.jobs.types import JobRecord, JobStatus, Outcome, Payload
from inferstack.protocol import rest
from inferstack.serving import ModelManager


@dataclass(slots=True)
class RetryableError(Exception):
    """The job may succeed if run again (elsewhere, or later)."""

    message: str

    def __str__(self) -> str:
        return self.message


class Runner(Protocol):
    async def run(self, record: JobRecord, payload: Payload) -> Outcome: ...

    async def close(self) -> None: ...


def _final_or_retry(error: InferenceServerError) -> Outcome:
    if 400 <= error.http_status < 500:
        return Outcome(JobStatus.FAILED, error=error.message, error_status=error.http_status)
    raise RetryableError(f"{error.http_status}: {error.message}")


class LocalRunner:
    """Through a ModelManager in this process (the server's own, or a worker's)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def run(self, record: JobRecord, payload: Payload) -> Outcome:
        try:
            target = self.manager.get(record.model, record.version)
            request = payloads.decode(payload, record.model, record.version)
            response = await target.infer(request)
        except InferenceServerError as error:
            return _final_or_retry(error)
        return Outcome(JobStatus.SUCCEEDED, result=payloads.encode_result(response))

    async def close(self) -> None:
        pass


class RemoteRunner:
    """Forwards the stored request to a KServe v2 server's ``/infer``."""

    def __init__(self, server_url: str, *, timeout: float = 600.0) -> None:
        self.base = server_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout)

    async def run(self, record: JobRecord, payload: Payload) -> Outcome:
        path = f"/v2/models/{quote(record.model, safe='')}"
        if record.version:
            path += f"/versions/{quote(record.version, safe='')}"
        headers = {"Content-Type": "application/json"}
        if payload.header_length is not None:
            headers[rest.HEADER_LENGTH] = str(payload.header_length)
            headers["Content-Type"] = "application/octet-stream"
        if record.request_id:
            headers["X-Request-ID"] = record.request_id
        try:
            response = await self._client.post(f"{self.base}{path}/infer", content=payload.body, headers=headers)
        except httpx.HTTPError as exc:
            raise RetryableError(f"cannot reach {self.base}: {type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            return Outcome(JobStatus.SUCCEEDED, result=response.content)
        try:
            message = orjson.loads(response.content).get("error") or response.text
        except (orjson.JSONDecodeError, AttributeError):
            message = response.text
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            return Outcome(JobStatus.FAILED, error=message, error_status=response.status_code)
        raise RetryableError(f"{response.status_code} from {self.base}: {message}")

    async def close(self) -> None:
        await self._client.aclose()
