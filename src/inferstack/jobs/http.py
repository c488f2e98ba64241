"""The async inference endpoints, added to the server's Starlette app.

- ``POST /v2/models/{m}[/versions/{v}]/infer/async``: a normal v2 infer body;
  202 with the job id and its status URL as soon as the job is queued.
- ``GET /v2/jobs/{id}[?wait=SECONDS]``: the job's status and, once it
  succeeded, the v2 inference response under ``result``; ``wait`` long-polls
  (answers when the job ends, or after that many seconds, at most 60).
- ``DELETE /v2/jobs/{id}``: cancel a queued job; 409 once it runs or ended.
"""

from __future__ import annotations

import asyncio
import re
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferstack.core.errors import InvalidArgumentError, NotFoundError
from inferstack.jobs import payload as payloads
from inferstack.jobs.queue import JobQueue
from inferstack.jobs.types import FINAL, JobRecord, JobSpec, JobStatus
from inferstack.observability.logs import request_id_var
from inferstack.protocol import rest
from inferstack.serving import ModelManager

_JSON = "application/json"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(r"^[1-9][0-9]*$")


#: Longest ``?wait=`` a status request may block.
MAX_WAIT = 60.0


def _wait_seconds(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        raise InvalidArgumentError(f"query parameter 'wait' must be a number of seconds, got {value!r}") from None
    if not 0 <= wait <= MAX_WAIT:
        raise InvalidArgumentError(f"query parameter 'wait' must be between 0 and {MAX_WAIT:.0f} seconds, got {value}")
    return wait


def job_document(record: JobRecord, result: bytes | None) -> bytes:
    """The job as JSON; the stored v2 response is spliced in as-is (never parsed again)."""
    expired = record.status is JobStatus.SUCCEEDED and result is None
    head = orjson.dumps(record.as_dict(expired=expired))
    if result is None or record.visible_status() is not JobStatus.SUCCEEDED:
        return head
    return head[:-1] + b',"result":' + result + b"}"


class JobsApi:
    """Handlers bound to one queue; ``routes(api)`` wraps them in the server's error handling."""

    def __init__(self, queue: JobQueue, manager: ModelManager, *, webhooks_enabled: bool) -> None:
        self.queue = queue
        self.manager = manager
        self.webhooks_enabled = webhooks_enabled

    async def submit(self, request: Request, model: str, version: str = "", *, body: bytes) -> Response:
        if not self.manager.known(model):
            raise NotFoundError(f"unknown model {model!r}")
        if version and not _VERSION.match(version):
            raise InvalidArgumentError(f"invalid model version {version!r}: expected a positive integer")
        header = request.headers.get(rest.HEADER_LENGTH)
        header_length = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidArgumentError(f"invalid Inference-Header-Content-Length {header!r}") from None
        payload, callback_url = payloads.prepare(body, header_length, model, version)
        if callback_url and not self.webhooks_enabled:
            raise InvalidArgumentError(
                f"request parameter {payloads.CALLBACK_PARAMETER!r} needs a webhook secret to sign callbacks; "
                "start the server with --webhook-secret (or INFERSTACK_WEBHOOK_SECRET)"
            )
        key = request.headers.get("idempotency-key", "")
        if len(key) > 255:
            raise InvalidArgumentError(f"Idempotency-Key is {len(key)} characters long; the limit is 255")
        record = await self.queue.submit(
            JobSpec(model=model, version=version, callback_url=callback_url, request_id=request_id_var.get(),
                    idempotency_key=key),
            payload,
        )
        status_url = f"/v2/jobs/{record.id}"
        content = {"id": record.id, "status": record.status.value, "status_url": status_url,
                   "model_name": model, "model_version": version}
        return Response(orjson.dumps(content), status_code=202, media_type=_JSON,
                        headers={"Location": status_url})

    async def status(self, request: Request, job_id: str) -> Response:
        record = await self._record(job_id)
        wait = _wait_seconds(request.query_params.get("wait"))
        if wait and record.status not in FINAL:
            # Long poll: answer as soon as the job ends, or after ``wait`` seconds either way.
            deadline = time.monotonic() + wait
            delay = 0.02
            while record.status not in FINAL and time.monotonic() < deadline:
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.25)
                record = await self._record(job_id)
        result = await self.queue.result(job_id) if record.status is JobStatus.SUCCEEDED else None
        return Response(job_document(record, result), media_type=_JSON)

    async def cancel(self, request: Request, job_id: str) -> Response:
        await self._record(job_id)
        record = await self.queue.cancel(job_id)
        return Response(orjson.dumps(record.as_dict()), media_type=_JSON)

    async def _record(self, job_id: str) -> JobRecord:
        if not _JOB_ID.match(job_id):
            raise NotFoundError(f"unknown job {job_id!r}")
        record = await self.queue.get(job_id)
        if record is None:
            raise NotFoundError(f"unknown job {job_id!r}")
        return record


def job_routes(jobs: JobsApi, http_api) -> list[Route]:
    """The routes, wrapped by ``HttpApi.handler`` (errors, request ids, response counts)."""

    async def infer_async(request: Request, model: str, version: str = "") -> Response:
        body = await http_api.read_body(request)
        return await jobs.submit(request, model, version, body=body)

    async def job_status(request: Request, job_id: str) -> Response:
        return await jobs.status(request, job_id)

    async def job_cancel(request: Request, job_id: str) -> Response:
        return await jobs.cancel(request, job_id)

    h = http_api.handler
    return [
        Route("/v2/models/{model}/infer/async", h(infer_async), methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer/async", h(infer_async), methods=["POST"]),
        Route("/v2/jobs/{job_id}", h(job_status), methods=["GET"]),
        Route("/v2/jobs/{job_id}", h(job_cancel), methods=["DELETE"]),
    ]
