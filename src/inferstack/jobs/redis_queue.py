"""The job queue on Redis Streams: durable, shared by any number of servers and workers.

Keys (``P`` is the queue prefix, ``inferstack:jobs`` by default)::

    P:stream          stream of {id: <job id>}; consumer group "workers"
    P:job:<id>        hash: the job record (status, attempts, timings, errors, webhook)
    P:payload:<id>    the request body, stored once, deleted when the job ends
    P:result:<id>     the v2 JSON response, with a TTL (--job-result-ttl)
    P:dead            dead-letter stream: {id, model, attempts, reason}
    P:outcomes        hash: jobs finished, by outcome (cluster-wide counters)
    P:idem:<digest>   the job id an Idempotency-Key (per model and version) created

Delivery is at-least-once: a worker reads an entry with XREADGROUP, keeps it
with XCLAIM heartbeats while it runs, and acknowledges it (XACK + XDEL) only
when the final state is written. An entry whose worker stopped heartbeating
(killed, partitioned) sits idle in the pending list and is taken over with
XAUTOCLAIM after the visibility timeout. Every state change is one Lua
script, so the checks and writes cannot interleave between workers: the
final result is written exactly once however many times a job ran, and a
job claimed more than ``max_attempts`` times is failed and dead-lettered
instead of being run again. Since entries are deleted once acknowledged,
``XLEN P:stream`` is exactly the backlog (queued + running): what KEDA's
``redis-streams`` trigger scales workers on.
"""

from __future__ import annotations

import time
from typing import Any

from inferstack.core.errors import NotFoundError, UnavailableError
from inferstack.jobs.queue import QueueSettings, exhausted_reason, idempotency_digest, new_job_id
from inferstack.jobs.types import (
    Claim,
    ConflictError,
    JobRecord,
    JobSpec,
    JobStatus,
    Outcome,
    Payload,
    QueueStats,
)

GROUP = "workers"

# KEYS: job, payload, stream   ARGV: id, created, model, version, callback, ttl, request_id, body, header_length
# KEYS[4]: the idempotency key's mapping (ARGV[10] = 1 when the client sent one); ARGV[11]: its TTL (ms)
_SUBMIT = """
if ARGV[10] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'existing', existing} end
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[11])
end
redis.call('SET', KEYS[2], ARGV[8])
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'queued', 'created_at', ARGV[2], 'model', ARGV[3], 'version', ARGV[4],
  'callback_url', ARGV[5], 'result_ttl', ARGV[6], 'request_id', ARGV[7], 'header_length', ARGV[9],
  'attempts', 0, 'result_writes', 0, 'entry', entry, 'webhook_status', ARGV[5] ~= '' and 'pending' or '')
return {'new', entry}
"""

# Shared by the scripts that end a job: final state, result, ack, outcome counter.
# KEYS: job, payload, stream, result, outcomes, dead
_FINISH = """
local function drop(entry)
  redis.call('XACK', KEYS[3], '""" + GROUP + """', entry)
  redis.call('XDEL', KEYS[3], entry)
end
-- A job with a callback keeps its entry pending until the webhook is delivered (ack
-- script): a worker that dies in between leaves it to be reclaimed and delivered again.
local function finish(status, result, err, err_status, now, ttl, retention, entry)
  if status == 'succeeded' then
    redis.call('SET', KEYS[4], result, 'PX', math.floor(tonumber(ttl) * 1000))
  end
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', now, 'error', err, 'error_status', err_status)
  redis.call('HINCRBY', KEYS[1], 'result_writes', 1)
  redis.call('PEXPIRE', KEYS[1], math.floor((tonumber(ttl) + tonumber(retention)) * 1000))
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[5], status, 1)
  local callback = redis.call('HGET', KEYS[1], 'callback_url')
  if not callback or callback == '' then drop(entry) end
end
local function dead_letter(reason, now, ttl, retention, entry)
  finish('failed', '', reason, 500, now, ttl, retention, entry)
  redis.call('HINCRBY', KEYS[5], 'dead_lettered', 1)
  local job = redis.call('HMGET', KEYS[1], 'model', 'version', 'attempts')
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', 'id', ARGV[1], 'model', job[1], 'version', job[2],
    'attempts', job[3], 'reason', reason, 'at', now)
end
"""

# ARGV: id, entry, consumer, now, max_attempts, ttl, retention, reason_if_exhausted
_CLAIM = _FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then drop(ARGV[2]) return {'gone'} end
if status ~= 'queued' and status ~= 'running' then
  local job = redis.call('HMGET', KEYS[1], 'callback_url', 'webhook_status')
  if status ~= 'cancelled' and job[1] and job[1] ~= '' and job[2] == 'pending' then
    return {'webhook', '', redis.call('HGETALL', KEYS[1])}  -- finished, its webhook not sent yet
  end
  drop(ARGV[2])
  return {'skip', status}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
if attempts >= tonumber(ARGV[5]) then
  local last = redis.call('HGET', KEYS[1], 'last_error')
  local reason = ARGV[8]
  if last and last ~= '' then reason = 'gave up after ' .. attempts .. ' attempt(s): ' .. last end
  dead_letter(reason, ARGV[4], ARGV[6], ARGV[7], ARGV[2])
  return {'dead', reason}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[4], 'worker', ARGV[3], 'entry', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {'run', redis.call('GET', KEYS[2]) or '', redis.call('HGETALL', KEYS[1])}
"""

# ARGV: id, entry, status, result, error, error_status, now, ttl, retention
_COMPLETE = _FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  drop(ARGV[2])
  if status then redis.call('HINCRBY', KEYS[1], 'duplicate_completions', 1) end
  return 0
end
finish(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[2])
return 1
"""

# ARGV: id, entry, error, now, max_attempts, ttl, retention
_RETRY = _FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then drop(ARGV[2]) return {'skip'} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
redis.call('HSET', KEYS[1], 'last_error', ARGV[3], 'error', ARGV[3])
if attempts >= tonumber(ARGV[5]) then
  local reason = 'gave up after ' .. attempts .. ' attempt(s): ' .. ARGV[3]
  dead_letter(reason, ARGV[4], ARGV[6], ARGV[7], ARGV[2])
  return {'dead'}
end
drop(ARGV[2])
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'queued', 'entry', entry)
return {'queued'}
"""

# ARGV: id, now, ttl, retention
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status ~= 'queued' then return status end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.floor((tonumber(ARGV[3]) + tonumber(ARGV[4])) * 1000))
redis.call('DEL', KEYS[2])
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[3], '""" + GROUP + """', entry)
redis.call('XDEL', KEYS[3], entry)
redis.call('HINCRBY', KEYS[5], 'cancelled', 1)
return 'ok'
"""


def _redis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("the Redis job queue needs redis-py: pip install 'inferstack[redis]'") from exc
    return aioredis


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def _float(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None


class RedisJobQueue:
    """Jobs in Redis Streams; see the module docstring for the key layout and guarantees."""

    def __init__(self, url: str, settings: QueueSettings | None = None, *, prefix: str = "inferstack:jobs") -> None:
        self.settings = settings or QueueSettings()
        self.url = url
        self.prefix = prefix
        self.stream = f"{prefix}:stream"
        self.dead = f"{prefix}:dead"
        self.outcomes = f"{prefix}:outcomes"
        self.client = _redis().from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self._scripts = {name: self.client.register_script(source) for name, source in (
            ("submit", _SUBMIT), ("claim", _CLAIM), ("complete", _COMPLETE), ("retry", _RETRY), ("cancel", _CANCEL))}
        self._group_ready = False
        #: XAUTOCLAIM cursor: where this consumer's scan of the pending list resumes.
        self._cursor = "0-0"
        self._next_scan = 0.0

    def _keys(self, job_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}:job:{job_id}", f"{p}:payload:{job_id}", self.stream, f"{p}:result:{job_id}",
                self.outcomes, self.dead]

    async def ensure_group(self) -> None:
        if self._group_ready:
            return
        from redis.exceptions import ResponseError

        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def ping(self) -> None:
        await self.client.ping()

    # -- clients --------------------------------------------------------------------

    async def submit(self, spec: JobSpec, payload: Payload) -> JobRecord:
        from redis.exceptions import RedisError

        job_id = new_job_id()
        now = time.time()
        s = self.settings
        idempotency = f"{self.prefix}:idem:{idempotency_digest(spec)}" if spec.idempotency_key else ""
        try:
            await self.ensure_group()
            reply = await self._scripts["submit"](keys=[*self._keys(job_id)[:3], idempotency or self.stream], args=[
                job_id, repr(now), spec.model, spec.version, spec.callback_url or "", s.result_ttl,
                spec.request_id, payload.body, "" if payload.header_length is None else payload.header_length,
                1 if idempotency else 0, int((s.result_ttl + s.record_retention) * 1000),
            ])
            if _text(reply[0]) == "existing":
                record = await self.get(_text(reply[1]))
                if record is not None:
                    return record
                # The key outlived its job (cannot happen with the TTLs used; never return a job not created).
                await self.client.delete(idempotency)
                return await self.submit(spec, payload)
        except RedisError as exc:
            raise UnavailableError(f"the job queue (Redis) is unavailable: {exc}", retry_after=1.0) from None
        return JobRecord(id=job_id, model=spec.model, version=spec.version, created_at=now,
                         callback_url=spec.callback_url, result_ttl=self.settings.result_ttl,
                         request_id=spec.request_id, webhook_status="pending" if spec.callback_url else "")

    async def get(self, job_id: str) -> JobRecord | None:
        from redis.exceptions import RedisError

        try:
            fields = await self.client.hgetall(f"{self.prefix}:job:{job_id}")
        except RedisError as exc:
            raise UnavailableError(f"the job queue (Redis) is unavailable: {exc}", retry_after=1.0) from None
        if not fields:
            return None
        return _record(job_id, {_text(k): v for k, v in fields.items()})

    async def result(self, job_id: str) -> bytes | None:
        from redis.exceptions import RedisError

        try:
            return await self.client.get(f"{self.prefix}:result:{job_id}")
        except RedisError as exc:
            raise UnavailableError(f"the job queue (Redis) is unavailable: {exc}", retry_after=1.0) from None

    async def cancel(self, job_id: str) -> JobRecord:
        from redis.exceptions import RedisError

        keys = self._keys(job_id)
        try:
            outcome = _text(await self._scripts["cancel"](keys=keys, args=[
                job_id, repr(time.time()), self.settings.result_ttl, self.settings.record_retention]))
        except RedisError as exc:
            raise UnavailableError(f"the job queue (Redis) is unavailable: {exc}", retry_after=1.0) from None
        record = await self.get(job_id)
        if not outcome or record is None:
            raise NotFoundError(f"unknown job {job_id!r}")
        if outcome != "ok":
            raise ConflictError(
                f"job {job_id!r} is {record.visible_status().value}; only a queued job can be cancelled")
        return record

    # -- workers --------------------------------------------------------------------

    async def claim(self, consumer: str, block: float) -> Claim | None:
        await self.ensure_group()
        entry = await self._reclaim(consumer)
        if entry is None:
            reply = await self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1,
                                                 block=max(1, int(block * 1000)))
            if not reply:
                return None
            entry = reply[0][1][0]
        entry_id, fields = _text(entry[0]), entry[1] or {}
        job_id = _text(fields.get(b"id") or fields.get("id"))
        if not job_id:  # not one of ours; never let it block the group
            await self.client.xack(self.stream, GROUP, entry_id)
            return None
        s = self.settings
        reply = await self._scripts["claim"](keys=self._keys(job_id), args=[
            job_id, entry_id, consumer, repr(time.time()), s.max_attempts, s.result_ttl, s.record_retention,
            exhausted_reason(s.max_attempts, ""),
        ])
        verdict = _text(reply[0])
        if verdict == "webhook":  # finished by a worker that died before its webhook went out
            flat = reply[2]
            fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
            return Claim(_record(job_id, fields), Payload(b""), entry_id, webhook_only=True)
        if verdict == "dead":  # the worker only records the outcome and sends the webhook
            record = await self.get(job_id)
            return Claim(record, Payload(b""), entry_id) if record is not None else None
        if verdict != "run":
            return None
        flat = reply[2]
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        header = _text(fields.get("header_length"))
        return Claim(_record(job_id, fields), Payload(reply[1], int(header) if header else None), entry_id)

    async def _reclaim(self, consumer: str) -> Any:
        """One pending entry idle past the visibility timeout, now owned by ``consumer``; else None.

        The pending list is scanned at most every quarter visibility timeout (and
        continuously while a scan is under way), not before every claim: a stale
        entry waits a little longer, a busy queue saves a round trip per job.
        """
        now = time.monotonic()
        if self._cursor == "0-0" and now < self._next_scan:
            return None
        self._next_scan = now + min(1.0, self.settings.visibility_timeout / 4)
        idle_ms = max(1, int(self.settings.visibility_timeout * 1000))
        reply = await self.client.xautoclaim(self.stream, GROUP, consumer, idle_ms, start_id=self._cursor, count=1)
        cursor, entries = _text(reply[0]), reply[1]
        self._cursor = cursor
        for entry in entries:
            if entry and entry[1] is not None:
                return entry
        return None

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        """Reset the entry's idle time (XCLAIM JUSTID): a live worker keeps its job."""
        await self.client.xclaim(self.stream, GROUP, consumer, 0, [claim.token], justid=True)

    async def complete(self, claim: Claim, outcome: Outcome) -> bool:
        job_id = claim.record.id
        now = time.time()
        written = await self._scripts["complete"](keys=self._keys(job_id), args=[
            job_id, claim.token, outcome.status.value, outcome.result, outcome.error,
            "" if outcome.error_status is None else outcome.error_status, repr(now),
            self.settings.result_ttl, self.settings.record_retention,
        ])
        if written:
            record = claim.record
            record.status, record.finished_at = outcome.status, now
            record.error, record.error_status = outcome.error, outcome.error_status
            record.result_writes += 1
        return bool(written)

    async def retry(self, claim: Claim, error: str) -> JobRecord:
        job_id = claim.record.id
        s = self.settings
        await self._scripts["retry"](keys=self._keys(job_id), args=[
            job_id, claim.token, error, repr(time.time()), s.max_attempts, s.result_ttl, s.record_retention])
        return await self.get(job_id) or claim.record

    async def ack(self, claim: Claim) -> None:
        """Release a finished job's entry (after its webhook was delivered, or given up)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, claim.token)
            pipe.xdel(self.stream, claim.token)
            await pipe.execute()

    async def set_webhook(self, job_id: str, status: str, attempts: int, error: str) -> None:
        key = f"{self.prefix}:job:{job_id}"
        # Only on a record that still exists (never recreate an expired one).
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if await pipe.exists(key):
                pipe.multi()
                pipe.hset(key, mapping={"webhook_status": status, "webhook_attempts": attempts,
                                        "webhook_error": error})
                await pipe.execute()

    async def stats(self) -> QueueStats:
        await self.ensure_group()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, GROUP)
            pipe.xrange(self.stream, count=1)
            pipe.hgetall(self.outcomes)
            pipe.xlen(self.dead)
            length, pending, first, outcomes, dead = await pipe.execute()
        pending_count = int(pending["pending"]) if pending else 0
        oldest = 0.0
        if first:
            entry_id, fields = first[0]
            created = _float(await self.client.hget(f"{self.prefix}:job:{_text(fields.get(b'id'))}", "created_at"))
            if created is None:
                created = int(_text(entry_id).split("-")[0]) / 1000
            oldest = max(0.0, time.time() - created)
        return QueueStats(
            queued=max(0, length - pending_count),
            pending=pending_count,
            oldest_age=oldest,
            outcomes={_text(k): int(v) for k, v in outcomes.items()},
            dead_letters=dead,
        )

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        entries = await self.client.xrevrange(self.dead, count=count)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in reversed(entries)]

    async def close(self) -> None:
        await self.client.aclose()


def _record(job_id: str, f: dict[str, Any]) -> JobRecord:
    error_status = _text(f.get("error_status"))
    return JobRecord(
        id=job_id,
        model=_text(f.get("model")),
        version=_text(f.get("version")),
        status=JobStatus(_text(f.get("status")) or "queued"),
        created_at=_float(f.get("created_at")) or 0.0,
        started_at=_float(f.get("started_at")),
        finished_at=_float(f.get("finished_at")),
        attempts=int(_text(f.get("attempts")) or 0),
        error=_text(f.get("error")),
        error_status=int(error_status) if error_status else None,
        callback_url=_text(f.get("callback_url")) or None,
        webhook_status=_text(f.get("webhook_status")),
        webhook_attempts=int(_text(f.get("webhook_attempts")) or 0),
        webhook_error=_text(f.get("webhook_error")),
        result_writes=int(_text(f.get("result_writes")) or 0),
        result_ttl=_float(f.get("result_ttl")) or 0.0,
        request_id=_text(f.get("request_id")),
    )
