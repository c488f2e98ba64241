"""The dynamic batcher with a fake instance whose execution the test controls."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from inferstack.backends.base import ModelInstance
from inferstack.core.errors import InternalError, InvalidArgumentError, RequestTimeoutError, UnavailableError
from inferstack.core.stats import ModelStats
from inferstack.scheduling import QueuePolicy, Scheduler, SchedulerConfig

WAIT = 30  # seconds; generous, only reached when something is broken


class GatedInstance(ModelInstance):
    """Doubles INPUT0; blocks on ``gate`` so the test can build a queue behind it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.batches: list[list[float]] = []  # first element of every row, per execution
        self.started = threading.Event()

    def execute(self, inputs, outputs):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        x = inputs["INPUT0"]
        self.batches.append(x[:, 0].tolist())
        if (x == -1).any():
            raise RuntimeError("poisoned input")
        return {"OUTPUT0": x * 2}


def rows(start: float, count: int, width: int = 3) -> np.ndarray:
    return np.arange(start, start + count, dtype=np.float32).repeat(width).reshape(count, width)


def make(config: SchedulerConfig, *instances: ModelInstance) -> Scheduler:
    return Scheduler(config, list(instances), ModelStats())


def batching(**kwargs) -> SchedulerConfig:
    kwargs.setdefault("max_batch_size", 8)
    return SchedulerConfig(model="m", dynamic_batching=True, **kwargs)


async def wait_started(instance: GatedInstance) -> None:
    assert await asyncio.to_thread(instance.started.wait, WAIT)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_queued_requests_batch_together_and_outputs_split_back_in_order():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(max_batch_size=16), instance)
        first = scheduler.submit({"INPUT0": rows(100, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        inputs = [rows(i * 10, 1 + i % 3) for i in range(6)]  # batch sizes 1,2,3,1,2,3
        futures = [scheduler.submit({"INPUT0": x}, ["OUTPUT0"], batch_size=len(x)) for x in inputs]
        assert scheduler.pending == 6
        gate.set()
        await first
        results = await asyncio.gather(*futures)
        for x, result in zip(inputs, results):
            np.testing.assert_array_equal(result["OUTPUT0"], x * 2)
        assert instance.batches[0] == [100]
        assert len(instance.batches) == 2 and len(instance.batches[1]) == 12
        assert scheduler.stats.execution_count == 2
        assert scheduler.stats.inference_count == 13
        await scheduler.close()

    run(main())


def test_batches_never_exceed_max_batch_size():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(max_batch_size=4), instance)
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(11)]
        await wait_started(instance)
        gate.set()
        await asyncio.gather(*futures)
        assert all(len(batch) <= 4 for batch in instance.batches)
        assert sorted(v for batch in instance.batches for v in batch) == list(range(11))
        await scheduler.close()

    run(main())


def test_requests_with_different_shapes_are_never_concatenated():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(), instance)
        blocker = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        narrow = [rows(10 + i, 1, width=3) for i in range(3)]
        wide = [rows(20 + i, 1, width=5) for i in range(3)]
        futures = [scheduler.submit({"INPUT0": x}, ["OUTPUT0"], batch_size=1) for x in narrow + wide]
        gate.set()
        results = await asyncio.gather(blocker, *futures)
        for x, result in zip(narrow + wide, results[1:]):
            np.testing.assert_array_equal(result["OUTPUT0"], x * 2)
        assert instance.batches[1:] == [[10, 11, 12], [20, 21, 22]]
        await scheduler.close()

    run(main())


def test_preferred_batch_size_cuts_early():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(preferred_batch_sizes=(2,), max_queue_delay_us=100_000), instance)
        blocker = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(1, 6)]
        gate.set()
        await asyncio.gather(blocker, *futures)
        # 5 queued -> preferred 2, 2, then the last one alone once the delay ends.
        assert [len(b) for b in instance.batches] == [1, 2, 2, 1]
        await scheduler.close()

    run(main())


def test_batcher_waits_for_the_queue_delay_then_sends_what_it_has():
    async def main():
        instance = GatedInstance()
        scheduler = make(batching(max_batch_size=4, max_queue_delay_us=30_000_000), instance)
        # Three requests wait (the delay is far away); the fourth fills the batch.
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(3)]
        await asyncio.sleep(0.05)
        assert instance.batches == [] and scheduler.pending == 3
        futures.append(scheduler.submit({"INPUT0": rows(3, 1)}, ["OUTPUT0"], batch_size=1))
        await asyncio.gather(*futures)
        assert instance.batches == [[0, 1, 2, 3]]
        await scheduler.close()

        short = make(batching(max_batch_size=4, max_queue_delay_us=20_000), instance)
        alone = await short.submit({"INPUT0": rows(7, 1)}, ["OUTPUT0"], batch_size=1)
        np.testing.assert_array_equal(alone["OUTPUT0"], rows(7, 1) * 2)
        await short.close()

    run(main())


def test_request_larger_than_every_preferred_size_still_runs():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(preferred_batch_sizes=(2,), max_queue_delay_us=10_000), instance)
        blocker = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        big = scheduler.submit({"INPUT0": rows(10, 3)}, ["OUTPUT0"], batch_size=3)
        gate.set()
        await blocker
        result = await big
        np.testing.assert_array_equal(result["OUTPUT0"], rows(10, 3) * 2)
        await scheduler.close()

    run(main())


def test_zero_bounds_mean_unbounded():
    async def main():
        instance = GatedInstance()
        scheduler = make(SchedulerConfig(model="m", max_batch_size=8, server_max_queue_size=0), instance)
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(50)]
        await asyncio.gather(*futures)
        await scheduler.close()

    run(main())


def test_full_queue_rejects_at_once_with_retry_after():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(default_policy=QueuePolicy(max_queue_size=2)), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        queued = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in (1, 2)]
        with pytest.raises(UnavailableError, match="queue is full") as info:
            scheduler.submit({"INPUT0": rows(3, 1)}, ["OUTPUT0"], batch_size=1)
        assert info.value.retry_after
        gate.set()
        await asyncio.gather(running, *queued)
        # Room again once the queue drained.
        await scheduler.submit({"INPUT0": rows(4, 1)}, ["OUTPUT0"], batch_size=1)
        await scheduler.close()

    run(main())


def test_server_wide_bound_applies_when_the_policy_sets_none():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(SchedulerConfig(model="m", max_batch_size=8, server_max_queue_size=1), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        queued = scheduler.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1)
        with pytest.raises(UnavailableError):
            scheduler.submit({"INPUT0": rows(2, 1)}, ["OUTPUT0"], batch_size=1)
        gate.set()
        await asyncio.gather(running, queued)
        await scheduler.close()

    run(main())


def test_timed_out_request_is_rejected_and_never_executed():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        policy = QueuePolicy(default_timeout_us=1000)
        scheduler = make(batching(default_policy=policy), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        late = scheduler.submit({"INPUT0": rows(5, 1)}, ["OUTPUT0"], batch_size=1)
        with pytest.raises(RequestTimeoutError, match="timed out"):
            await late
        assert scheduler.pending == 0
        gate.set()
        await running
        await scheduler.close()
        assert [5.0] not in instance.batches and all(5.0 not in b for b in instance.batches)

    run(main())


def test_request_timeout_parameter_overrides_only_when_allowed():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(default_policy=QueuePolicy(default_timeout_us=60_000_000)), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        # Not allowed to override: the 60 s default stands, the 1 µs ask is ignored.
        kept = scheduler.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1, timeout_us=1)
        await asyncio.sleep(0.05)
        assert not kept.done()
        gate.set()
        await asyncio.gather(running, kept)
        await scheduler.close()

        gate.clear()
        instance.started.clear()
        allowed = make(batching(default_policy=QueuePolicy(allow_timeout_override=True)), instance)
        running = allowed.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        with pytest.raises(RequestTimeoutError):
            await allowed.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1, timeout_us=1000)
        gate.set()
        await running
        await allowed.close()

        # A request may shorten the default but never lengthen it.
        gate.clear()
        instance.started.clear()
        policy = QueuePolicy(default_timeout_us=1000, allow_timeout_override=True)
        capped = make(batching(default_policy=policy), instance)
        running = capped.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        with pytest.raises(RequestTimeoutError):
            await capped.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1, timeout_us=60_000_000)
        gate.set()
        await running
        await capped.close()

    run(main())


def test_delay_action_runs_expired_requests_after_the_others():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        policy = QueuePolicy(default_timeout_us=1000, delay_on_timeout=True)
        scheduler = make(batching(max_batch_size=1, default_policy=policy), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        expired = scheduler.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1)
        await asyncio.sleep(0.05)  # its timeout passes: it moves behind newer requests
        fresh = scheduler.submit({"INPUT0": rows(2, 1)}, ["OUTPUT0"], batch_size=1, timeout_us=None)
        gate.set()
        await asyncio.gather(running, expired, fresh)
        assert instance.batches == [[0], [2], [1]] or instance.batches == [[0], [1], [2]]
        await scheduler.close()

    run(main())


def test_cancelled_request_is_dropped_before_execution():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(), instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        gone = scheduler.submit({"INPUT0": rows(9, 1)}, ["OUTPUT0"], batch_size=1)
        kept = scheduler.submit({"INPUT0": rows(3, 1)}, ["OUTPUT0"], batch_size=1)
        gone.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert scheduler.pending == 1
        gate.set()
        await asyncio.gather(running, kept)
        assert instance.batches == [[0], [3]]
        await scheduler.close()

    run(main())


def test_higher_priority_runs_first():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        config = batching(max_batch_size=1, priority_levels=2, default_priority_level=2)
        scheduler = make(config, instance)
        running = scheduler.submit({"INPUT0": rows(0, 1)}, ["OUTPUT0"], batch_size=1)
        await wait_started(instance)
        low = scheduler.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1)  # default: 2
        high = scheduler.submit({"INPUT0": rows(2, 1)}, ["OUTPUT0"], batch_size=1, priority=1)
        with pytest.raises(InvalidArgumentError, match="priority 3"):
            scheduler.submit({"INPUT0": rows(3, 1)}, ["OUTPUT0"], batch_size=1, priority=3)
        gate.set()
        await asyncio.gather(running, low, high)
        assert instance.batches == [[0], [2], [1]]
        await scheduler.close()

    run(main())


def test_without_dynamic_batching_each_execution_takes_one_request():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(SchedulerConfig(model="m", max_batch_size=8), instance)
        futures = [scheduler.submit({"INPUT0": rows(i, 2)}, ["OUTPUT0"], batch_size=2) for i in range(4)]
        await wait_started(instance)
        gate.set()
        await asyncio.gather(*futures)
        assert [len(b) for b in instance.batches] == [2, 2, 2, 2]
        await scheduler.close()

    run(main())


def test_instances_execute_concurrently():
    async def main():
        gate = threading.Event()
        first, second = GatedInstance(gate), GatedInstance(gate)
        scheduler = make(batching(max_batch_size=1), first, second)
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(2)]
        await wait_started(first)
        await wait_started(second)  # both run at the same time
        gate.set()
        await asyncio.gather(*futures)
        await scheduler.close()

    run(main())


def test_backend_failure_fails_only_its_batch():
    async def main():
        instance = GatedInstance()
        scheduler = make(batching(max_batch_size=1), instance)
        with pytest.raises(InternalError, match="poisoned"):
            await scheduler.submit({"INPUT0": rows(-1, 1)}, ["OUTPUT0"], batch_size=1)
        result = await scheduler.submit({"INPUT0": rows(4, 1)}, ["OUTPUT0"], batch_size=1)
        np.testing.assert_array_equal(result["OUTPUT0"], rows(4, 1) * 2)
        await scheduler.close()

    run(main())


def test_close_drains_queued_work_then_refuses_new_requests():
    async def main():
        gate = threading.Event()
        instance = GatedInstance(gate)
        scheduler = make(batching(max_batch_size=2), instance)
        futures = [scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1) for i in range(5)]
        await wait_started(instance)
        closing = asyncio.ensure_future(scheduler.close(timeout=WAIT))
        await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError, match="unloading"):
            scheduler.submit({"INPUT0": rows(9, 1)}, ["OUTPUT0"], batch_size=1)
        gate.set()
        await closing
        results = await asyncio.gather(*futures)
        assert len(results) == 5

    run(main())


def test_sub_millisecond_delay_does_not_busy_wait():
    """uvloop timers have millisecond granularity: a 200 µs delay must not spin."""
    import uvloop

    async def main():
        instance = GatedInstance()
        scheduler = make(batching(max_batch_size=4, max_queue_delay_us=200), instance)
        calls = 0
        original = scheduler._next_batch

        def counting(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        scheduler._next_batch = counting
        for i in range(20):
            await scheduler.submit({"INPUT0": rows(i, 1)}, ["OUTPUT0"], batch_size=1)
        await scheduler.close()
        assert calls <= 20 * 4, f"{calls} batching decisions for 20 requests: the scheduler spins"

    uvloop.run(asyncio.wait_for(main(), 120))


class UnloadTracking(GatedInstance):
    """Records whether it was unloaded while a batch was still executing on it."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(gate)
        self.executing = False
        self.unloaded_while_executing = False

    def execute(self, inputs, outputs):
        self.executing = True
        try:
            return super().execute(inputs, outputs)
        finally:
            self.executing = False

    def unload(self) -> None:
        self.unloaded_while_executing |= self.executing


def test_close_right_after_submit_waits_for_the_dispatched_batch():
    """Dispatching empties the queue before the batch counts as running; a close waiting
    at that moment must not see the scheduler idle and unload the instance under it."""

    async def main():
        gate = threading.Event()
        instance = UnloadTracking(gate)
        # The batching delay makes the dispatch happen while close() already waits.
        scheduler = make(batching(max_queue_delay_us=100_000), instance)
        future = scheduler.submit({"INPUT0": rows(1, 1)}, ["OUTPUT0"], batch_size=1)
        closing = asyncio.ensure_future(scheduler.close(timeout=WAIT))
        await wait_started(instance)
        await asyncio.sleep(0.05)
        assert not closing.done(), "close returned while a batch was executing"
        gate.set()
        await closing
        np.testing.assert_array_equal((await future)["OUTPUT0"], rows(1, 1) * 2)
        assert not instance.unloaded_while_executing

    run(main())
