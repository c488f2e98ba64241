"""The per-model scheduler: bounded priority queues, the dynamic batcher, dispatch.

Requests wait in one queue per priority level. Whenever an instance is idle
the scheduler cuts the next batch from the queue heads (highest priority
first):

* a batch never mixes requests whose inputs differ in anything but the batch
  dimension (names, datatypes, non-batch shapes) — it stops at the first
  request that does not fit, so order is kept;
* it is cut at once when it reaches ``max_batch_size``, reaches a
  ``preferred_batch_size``, cannot grow because the next request does not
  fit, or the oldest request in it has waited ``max_queue_delay``;
* otherwise the scheduler sleeps until a request arrives or that delay ends.

Nothing polls: the loop waits on one event, set by arrivals, finished
batches and a single timer for the batching deadline. Batches execute on the
instance's own thread (ONNX Runtime releases the GIL), and their completion
comes back to the loop through ``call_soon_threadsafe``.

A model without ``dynamic_batching`` goes through the same queue but each
execution takes exactly one request, which is Triton's default scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from inferstack.backends.base import ModelInstance
from inferstack.core.errors import (
    InferenceServerError,
    InternalError,
    InvalidArgumentError,
    RequestTimeoutError,
    UnavailableError,
)
from inferstack.core.stats import ModelStats

log = logging.getLogger("inferstack.scheduling")

_QUEUED, _RUNNING, _DONE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy`` for one priority level."""

    max_queue_size: int = 0  # 0: bounded only by the server-wide default
    default_timeout_us: int = 0  # 0: no timeout
    allow_timeout_override: bool = False
    delay_on_timeout: bool = False  # timeout_action DELAY instead of REJECT


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """What the scheduler needs from a model's config, already validated."""

    model: str
    max_batch_size: int = 0  # 0: the model does not batch
    dynamic_batching: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    priority_levels: int = 0
    default_priority_level: int = 0
    default_policy: QueuePolicy = QueuePolicy()
    level_policies: dict[int, QueuePolicy] = field(default_factory=dict)
    #: Upper bound on queued requests per level when a policy sets none.
    server_max_queue_size: int = 1024


class _Entry:
    """A queued request: its inputs, its place in a batch, its future."""

    __slots__ = (
        "inputs", "outputs", "batch_size", "batch_key", "future",
        "enqueued_ns", "state", "timer", "delayed", "level", "request",
    )

    def __init__(self, inputs: dict[str, np.ndarray], outputs: Sequence[str], batch_size: int,
                 future: asyncio.Future, level: int) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.batch_size = batch_size
        # Requests batch together only when everything but dim 0 agrees.
        self.batch_key = tuple(
            (name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items())
        )
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.delayed = False
        self.level = level
        #: The originating request (id, parameters) for backends that execute per request.
        self.request: object = None


class _Level:
    __slots__ = ("queue", "policy", "live", "max_size")

    def __init__(self, policy: QueuePolicy, server_max: int) -> None:
        self.queue: deque[_Entry] = deque()
        self.policy = policy
        self.live = 0
        # 0 at both levels means unbounded.
        self.max_size = policy.max_queue_size or server_max or sys.maxsize


class _Worker:
    """One model instance and the thread it runs on."""

    __slots__ = ("instance", "executor", "index")

    def __init__(self, instance: ModelInstance, index: int, model: str) -> None:
        self.instance = instance
        self.index = index
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{model}-{index}")


class Scheduler:
    """Queues, batches and dispatches requests for one model version."""

    def __init__(self, config: SchedulerConfig, instances: Sequence[ModelInstance], stats: ModelStats) -> None:
        if not instances:
            raise ValueError("a scheduler needs at least one instance")
        self.config = config
        self.stats = stats
        self._workers = [_Worker(inst, i, config.model) for i, inst in enumerate(instances)]
        self._idle: list[_Worker] = list(reversed(self._workers))
        nlevels = max(config.priority_levels, 1)
        self._levels = [
            _Level(config.level_policies.get(i + 1, config.default_policy), config.server_max_queue_size)
            for i in range(nlevels)
        ]
        # Requests whose timeout expired under timeout_action DELAY run after all others.
        self._delayed: deque[_Entry] = deque()
        self._live = 0
        self._running = 0
        self._batching = config.dynamic_batching and config.max_batch_size > 0
        self._max_batch = config.max_batch_size if self._batching else 1
        self._preferred = tuple(sorted(set(config.preferred_batch_sizes)))
        self._delay_ns = config.max_queue_delay_us * 1000
        self._wakeup = asyncio.Event()
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"scheduler:{config.model}")

    # -- public -----------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting in the queue (the autoscaling signal)."""
        return self._live

    @property
    def in_flight(self) -> int:
        """Requests queued or executing."""
        return self._live + self._running

    @property
    def closing(self) -> bool:
        """True once ``close`` started: ``submit`` refuses from then on."""
        return self._closing

    def submit(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        *,
        batch_size: int,
        priority: int = 0,
        timeout_us: int | None = None,
        request: object = None,
    ) -> asyncio.Future:
        """Queue a request; the future resolves to its output arrays.

        Raises UnavailableError at once if the queue is full or the model is
        shutting down: overload is answered immediately, never by waiting.
        Cancelling the future (client gone) drops the request if it has not
        started executing.
        """
        if self._closing:
            raise UnavailableError(f"model {self.config.model!r} is unloading")
        level_index = self._level_index(priority)
        level = self._levels[level_index]
        if level.live >= level.max_size:
            raise UnavailableError(
                f"model {self.config.model!r}: queue is full ({level.max_size} requests waiting)",
                retry_after=1.0,
            )
        future = self._loop.create_future()
        entry = _Entry(inputs, outputs, batch_size, future, level_index)
        entry.request = request
        policy = level.policy
        timeout = policy.default_timeout_us
        if timeout_us is not None:
            if not timeout:
                timeout = timeout_us  # no default: the request's own deadline applies
            elif policy.allow_timeout_override:
                timeout = min(timeout, timeout_us)  # may shorten, never lengthen (Triton)
        if timeout:
            entry.timer = self._loop.call_later(timeout / 1e6, self._expire, entry)
        future.add_done_callback(lambda _f, e=entry: self._on_future_done(e))
        level.queue.append(entry)
        level.live += 1
        self._live += 1
        self._idle_event.clear()
        if self._idle and not self._delay_ns:
            # An instance is free and nothing asks us to wait: dispatch from
            # here rather than waking the scheduler task for it.
            now = time.perf_counter_ns()
            decision = self._next_batch(now)
            if isinstance(decision, tuple):
                self._dispatch(self._idle.pop(), decision[0], decision[1], now)
                if not self._live:
                    return future
        self._wakeup.set()
        return future

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let queued and running work finish (bounded), then unload."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._idle_event.wait(), timeout)
        except TimeoutError:
            log.warning("model %s: %d requests still pending after %.0fs; failing them",
                        self.config.model, self.in_flight, timeout)
        for entry in self._all_entries():
            if entry.state == _QUEUED and not entry.future.done():
                entry.future.set_exception(UnavailableError(f"model {self.config.model!r} was unloaded"))
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        for worker in self._workers:
            worker.executor.shutdown(wait=False, cancel_futures=False)
        await asyncio.to_thread(self._unload_instances)

    # -- queue bookkeeping ------------------------------------------------------

    def _level_index(self, priority: int) -> int:
        levels = self.config.priority_levels
        if not levels:
            return 0
        if priority == 0:
            priority = self.config.default_priority_level or 1
        if not 1 <= priority <= levels:
            raise InvalidArgumentError(
                f"model {self.config.model!r}: priority {priority} is outside 1..{levels}"
            )
        return priority - 1

    def _remove(self, entry: _Entry) -> None:
        """Take a queued entry out of the counts (it stays in its deque as a tombstone)."""
        entry.state = _DONE if entry.state == _QUEUED else entry.state
        level = self._levels[entry.level]
        level.live -= 1
        self._live -= 1
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        self._check_idle()

    def _on_future_done(self, entry: _Entry) -> None:
        if entry.state == _QUEUED:  # cancelled or expired while waiting
            self._remove(entry)

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.state != _QUEUED:
            return
        if self._levels[entry.level].policy.delay_on_timeout:
            if not entry.delayed:
                entry.delayed = True
                self._delayed.append(entry)
            return
        entry.future.set_exception(
            RequestTimeoutError(f"model {self.config.model!r}: request timed out in the queue")
        )
        # Out of the queue now, not when the done-callback runs: a dispatch in
        # between must not execute a request whose client already has its error.
        self._remove(entry)

    def _check_idle(self) -> None:
        if self._live == 0 and self._running == 0:
            self._idle_event.set()

    def _all_entries(self) -> list[_Entry]:
        entries = [e for level in self._levels for e in level.queue]
        entries.extend(self._delayed)
        return entries

    # -- batching ---------------------------------------------------------------

    def _live_entries(self):
        """Queued entries in dispatch order; drops tombstones from the queue heads."""
        for level in self._levels:
            queue = level.queue
            while queue and not _waiting(queue[0], delayed=False):
                queue.popleft()
            for entry in queue:
                if _waiting(entry, delayed=False):
                    yield entry
        delayed = self._delayed
        while delayed and not _waiting(delayed[0], delayed=True):
            delayed.popleft()
        for entry in delayed:
            if _waiting(entry, delayed=True):
                yield entry

    def _next_batch(self, now_ns: int, delay_over: bool = False) -> tuple[list[_Entry], int] | int:
        """A batch ready to run, or the time (ns) at which to look again (0: nothing queued).

        ``delay_over``: the batching timer has fired, so the batch is cut even
        if the clock says the deadline is a few µs away (see ``_run``).
        """
        entries: list[_Entry] = []
        total = 0
        full = False
        key = None
        for entry in self._live_entries():
            if not self._batching:
                return [entry], max(entry.batch_size, 1)
            if key is None:
                key = entry.batch_key
            elif entry.batch_key != key or total + entry.batch_size > self._max_batch:
                full = True
                break
            entries.append(entry)
            total += entry.batch_size
            if total >= self._max_batch:
                full = True
                break
        if not entries:
            return 0
        if full:
            return entries, total
        if self._preferred and total >= self._preferred[0]:
            if total in self._preferred or total > self._preferred[-1]:
                target = max(p for p in self._preferred if p <= total)
                cut, size = [], 0
                for entry in entries:
                    if size + entry.batch_size > target:
                        break
                    cut.append(entry)
                    size += entry.batch_size
                if cut:
                    return cut, size
                # The oldest request alone is larger than the preferred size: no
                # preferred batch can start with it, so send what is there.
                return entries, total
        oldest = min(entry.enqueued_ns for entry in entries)
        deadline = oldest + self._delay_ns
        if delay_over or now_ns >= deadline:
            return entries, total
        return deadline

    async def _run(self) -> None:
        loop = self._loop
        wakeup = self._wakeup
        timer_fired = False

        def on_timer() -> None:
            nonlocal timer_fired
            timer_fired = True
            wakeup.set()

        delay_over = False
        while True:
            if not self._idle or not self._live:
                wakeup.clear()
                await wakeup.wait()
                continue
            now = time.perf_counter_ns()
            decision = self._next_batch(now, delay_over)
            if isinstance(decision, tuple):
                entries, size = decision
                self._dispatch(self._idle.pop(), entries, size, now)
                delay_over = False
                continue
            wakeup.clear()
            if decision:  # wait for more requests, at most until the deadline
                # Event-loop timers have millisecond granularity (libuv), so a
                # sub-millisecond delay can fire "early"; looping until the
                # clock agrees would busy-wait. The delay is a maximum, so a
                # fired timer means: cut now.
                timer_fired = False
                timer = loop.call_later((decision - now) / 1e9, on_timer)
                await wakeup.wait()
                timer.cancel()
                delay_over = timer_fired
            else:
                await wakeup.wait()

    def _dispatch(self, worker: _Worker, entries: list[_Entry], size: int, now_ns: int) -> None:
        # Running before they leave the queue: otherwise the last _remove() sees
        # nothing queued and nothing running, sets the idle event, and a close()
        # waiting on it unloads the instance under this batch.
        self._running += len(entries)
        for entry in entries:
            self._remove(entry)
            entry.state = _RUNNING
            self.stats.record_queue(now_ns - entry.enqueued_ns)
        self._idle_event.clear()
        outputs = _union(entries)
        job = worker.executor.submit(_execute, worker.instance, entries, outputs, size)
        job.add_done_callback(lambda fut: self._finish_threadsafe(worker, entries, size, fut))

    def _finish_threadsafe(self, worker: _Worker, entries: list[_Entry], size: int, job: ThreadFuture) -> None:
        """Runs on the instance thread: hand the finished batch back to the loop."""
        try:
            self._loop.call_soon_threadsafe(self._finish, worker, entries, size, job)
        except RuntimeError:  # the loop is closed: the process is exiting, nobody waits
            pass

    def _finish(self, worker: _Worker, entries: list[_Entry], size: int, job: ThreadFuture) -> None:
        self._idle.append(worker)
        self._running -= len(entries)
        self._check_idle()
        self._wakeup.set()
        error = job.exception()
        if error is not None:
            if not isinstance(error, InferenceServerError):
                log.exception("model %s: execution failed", self.config.model, exc_info=error)
                error = InternalError(f"model {self.config.model!r}: {type(error).__name__}: {error}")
            for entry in entries:
                entry.state = _DONE
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        results, input_ns, infer_ns, output_ns = job.result()
        self.stats.record_execution(size, len(entries), input_ns, infer_ns, output_ns)
        for entry, result in zip(entries, results):
            entry.state = _DONE
            if not entry.future.done():
                if isinstance(result, BaseException):  # a per-request error (execute_requests)
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)

    def _unload_instances(self) -> None:
        for worker in self._workers:
            try:
                worker.instance.unload()
            except Exception:  # unloading must not stop the others from unloading
                log.exception("model %s: instance %d failed to unload", self.config.model, worker.index)


def _waiting(entry: _Entry, *, delayed: bool) -> bool:
    """Still to be executed: queued, in this queue, and not cancelled by its client.

    A cancelled future's done-callback runs one loop iteration later; checking
    the future itself keeps a dispatch in between from executing it.
    """
    return entry.state == _QUEUED and entry.delayed == delayed and not entry.future.done()


def _union(entries: list[_Entry]) -> list[str]:
    if len(entries) == 1:
        return list(entries[0].outputs)
    names: dict[str, None] = {}
    for entry in entries:
        names.update(dict.fromkeys(entry.outputs))
    return list(names)


def _execute(
    instance: ModelInstance, entries: list[_Entry], outputs: list[str], size: int
) -> tuple[list[dict[str, np.ndarray]], int, int, int]:
    """Runs on the instance's thread: gather inputs, execute, scatter outputs."""
    t0 = time.perf_counter_ns()
    if getattr(instance, "per_request", False):
        # Backends that want the batch as separate requests (Triton-style Python
        # models) get one call with every request's own inputs; each result is
        # that request's outputs or its own error.
        per_request = instance.execute_requests(  # type: ignore[attr-defined]
            [(entry.inputs, list(entry.outputs), entry.request) for entry in entries]
        )
        t1 = time.perf_counter_ns()
        return per_request, 0, t1 - t0, 0
    if len(entries) == 1:
        inputs = entries[0].inputs
    else:
        inputs = {
            name: np.concatenate([entry.inputs[name] for entry in entries])
            for name in entries[0].inputs
        }
    t1 = time.perf_counter_ns()
    results = instance.execute(inputs, outputs)
    t2 = time.perf_counter_ns()
    missing = [name for name in outputs if name not in results]
    if missing:
        raise InternalError(f"the backend did not produce outputs {missing}")
    if len(entries) == 1:
        entry = entries[0]
        split = [{name: results[name] for name in entry.outputs}]
    else:
        split = []
        offset = 0
        for name in outputs:
            array = results[name]
            if array.ndim == 0 or array.shape[0] != size:
                raise InternalError(
                    f"output {name!r} has shape {list(array.shape)}; a batch of {size} "
                    "needs it to start with the batch dimension"
                )
        for entry in entries:
            end = offset + entry.batch_size
            split.append({name: results[name][offset:end] for name in entry.outputs})
            offset = end
    t3 = time.perf_counter_ns()
    return split, t1 - t0, t2 - t1, t3 - t2


