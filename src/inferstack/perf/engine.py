"""The measurement engine of ``inferstack perf``: load levels, windows, stability.

A *level* is one concurrency (closed loop: N requests always in flight, each
sent as soon as the previous one on its slot answered) or one request rate
(open loop: sends follow a precomputed schedule whatever the server does).

A :class:`LoadGenerator` produces the load in one process and closes a
measurement *window* every ``--measurement-interval`` on a fixed grid
(``t0 + k * interval``, CLOCK_MONOTONIC, so several worker processes share
the grid). Latency samples go to the window in which the response arrived.
With ``--workers N``, :class:`ProcessPool` runs one generator per process
(spawned) and merges their windows, latency samples included.

The :class:`Controller` runs a level: it takes window after window, reads the
server's statistics at each window boundary, and stops when the last three
windows' throughputs are all within ``--stability-percentage`` of their mean
(perf_analyzer's rule), when ``--max-trials`` windows were taken (the level is
then *unstable*), or when a whole window failed (*failed*). The level's
numbers are those of its last (up to) three windows, merged.

Open loop: the schedule of send times (constant intervals, or exponential
intervals for ``poisson``) is computed before the level starts. A request's
latency is measured from its *scheduled* send time when it leaves late, so a
client or connection that falls behind shows up as latency instead of being
hidden (no coordinated omission). The event loop's timers have about 1 ms
resolution, so sends due within the next millisecond are released together;
one that leaves early is measured from when it left. A request that left more
than one interval (``1 / rate``, at least 1 ms) after its scheduled time is
counted as *late*.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferstack.perf.clients import (
    DEFAULT_TIMEOUT,
    GrpcClient,
    PerfSetupError,
    RawConnection,
    ServerStats,
    http_infer,
)

#: Timer resolution of the event loop: sends due within this many seconds are released together.
TIMER_SLACK = 0.001
#: Most requests one generator keeps in flight in open-loop mode (HTTP: connections).
MAX_OUTSTANDING = 1024
#: Pause after a failed request in closed-loop mode, so a dead server is not hammered in a tight loop.
ERROR_PAUSE = 0.001
#: Windows compared for stability.
STABLE_WINDOWS = 3


# --------------------------------------------------------------------------------------
# Pure helpers: ranges, stability, schedules, percentiles
# --------------------------------------------------------------------------------------


def parse_range(text: str, *, integer: bool, option: str = "range") -> list[float] | list[int]:
    """``START[:END[:STEP]]`` -> the values from START to END inclusive (perf_analyzer's syntax).

    STEP defaults to 1. Integer ranges (concurrency) must hold positive integers;
    rate ranges may be fractional.
    """
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3 or any(p.strip() == "" for p in parts):
        raise PerfSetupError(f"{option} {text!r}: expected START, START:END or START:END:STEP")
    try:
        values = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        kind = "integers" if integer else "numbers"
        raise PerfSetupError(f"{option} {text!r}: START, END and STEP must be {kind}") from None
    if any(not math.isfinite(v) for v in values):
        raise PerfSetupError(f"{option} {text!r}: values must be finite")
    start = values[0]
    end = values[1] if len(values) > 1 else start
    step = values[2] if len(values) > 2 else 1
    if start <= 0:
        raise PerfSetupError(f"{option} {text!r}: START must be greater than 0")
    if end < start:
        raise PerfSetupError(f"{option} {text!r}: END must be at least START")
    if step <= 0:
        raise PerfSetupError(f"{option} {text!r}: STEP must be greater than 0")
    if integer:
        return list(range(int(start), int(end) + 1, int(step)))
    count = int(math.floor((end - start) / step + 1e-9)) + 1
    if count > 10_000:
        raise PerfSetupError(f"{option} {text!r}: more than 10000 levels")
    return [round(start + i * step, 9) for i in range(count)]


def is_stable(throughputs: Sequence[float], percentage: float, windows: int = STABLE_WINDOWS) -> bool:
    """The last ``windows`` throughputs are all within ``percentage`` % of their mean."""
    if len(throughputs) < windows:
        return False
    last = throughputs[-windows:]
    mean = sum(last) / windows
    if mean <= 0:
        return False
    return all(abs(v - mean) <= mean * percentage / 100.0 for v in last)


def make_schedule(rate: float, duration: float, distribution: str, rng: np.random.Generator,
                  phase: float = 0.0) -> np.ndarray:
    """Send times in seconds from the level's start, covering ``[0, duration)``.

    ``constant``: every ``1/rate`` from ``phase``; ``poisson``: exponential gaps
    of mean ``1/rate`` (a Poisson process), the first one drawn too.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if distribution == "constant":
        count = max(0, int(math.ceil((duration - phase) * rate)))
        return phase + np.arange(count, dtype=np.float64) / rate
    if distribution != "poisson":
        raise ValueError(f"unknown distribution {distribution!r}")
    chunks = []
    last = phase
    while True:
        n = max(16, int(rate * max(0.0, duration - last) * 1.1) + 16)
        times = last + np.cumsum(rng.exponential(1.0 / rate, size=n))
        chunks.append(times)
        last = float(times[-1])
        if last >= duration:
            break
    times = np.concatenate(chunks)
    return times[times < duration]


def percentile(sorted_values: np.ndarray | Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty).

    The smallest value with at least ``p`` % of the samples at or below it:
    always an observed latency, never an interpolation.
    """
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside [0, 100]")
    rank = max(1, int(math.ceil(p / 100.0 * n - 1e-9)))
    return float(sorted_values[min(rank, n) - 1])


# --------------------------------------------------------------------------------------
# Windows and results
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Window:
    """What one generator (or all of them, merged) measured in one window."""

    index: int
    duration: float  # seconds
    sent: int = 0
    ok: int = 0
    errors: int = 0
    late: int = 0
    send_delay_ns: int = 0  # summed lateness of the sends (open loop)
    latencies_ns: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    first_error: str | None = None
    server: ServerStats | None = None  # delta over the window, when the server has statistics

    @staticmethod
    def merge_parallel(parts: Sequence[Window]) -> Window:
        """Windows of the same index from several generators (running side by side)."""
        first_error = next((p.first_error for p in parts if p.first_error), None)
        return Window(
            index=parts[0].index,
            duration=sum(p.duration for p in parts) / len(parts),
            sent=sum(p.sent for p in parts),
            ok=sum(p.ok for p in parts),
            errors=sum(p.errors for p in parts),
            late=sum(p.late for p in parts),
            send_delay_ns=sum(p.send_delay_ns for p in parts),
            latencies_ns=np.concatenate([p.latencies_ns for p in parts]) if parts else np.empty(0, np.int64),
            first_error=first_error,
        )

    def throughput(self, batch_size: int) -> float:
        return self.ok * batch_size / self.duration if self.duration > 0 else 0.0

    def summary(self, batch_size: int) -> dict[str, Any]:
        lat = self.latencies_ns
        return {
            "index": self.index,
            "duration_s": round(self.duration, 6),
            "sent": self.sent,
            "completed": self.ok,
            "errors": self.errors,
            "late": self.late,
            "throughput": self.throughput(batch_size),
            "avg_latency_us": float(lat.mean()) / 1e3 if len(lat) else None,
        }


@dataclass(slots=True)
class Totals:
    """Everything one level sent, measured or not (windows before stability, the drain)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    first_error: str | None = None

    def add(self, other: Totals) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error


@dataclass(slots=True)
class LevelSpec:
    mode: str  # "concurrency" | "rate"
    value: float

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency {int(self.value)}"
        return f"{self.value:g} req/s"


@dataclass
class LevelResult:
    mode: str
    value: float
    batch_size: int
    status: str  # stable | unstable | failed
    windows: list[dict[str, Any]]
    measured_windows: int
    duration_s: float
    sent: int
    completed: int
    errors: int
    throughput: float  # infer/s (completed requests x batch size per second)
    request_throughput: float  # completed requests per second
    send_rate: float  # requests sent per second (the achieved rate in open loop)
    late: int
    avg_send_delay_us: float | None
    latency_us: dict[str, float | None]
    percentile: float
    first_error: str | None
    server: dict[str, Any] | None
    total_sent: int
    total_completed: int
    total_errors: int
    server_total: dict[str, Any] | None

    @property
    def label(self) -> str:
        return LevelSpec(self.mode, self.value).label

    def latency(self, key: str) -> float | None:
        return self.latency_us.get(key)

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.mode == "concurrency":
            out["value"] = int(self.value)
        return out


def _latency_summary(latencies_ns: np.ndarray, extra: float) -> dict[str, float | None]:
    if len(latencies_ns) == 0:
        keys = ["avg", "min", "max", "p50", "p90", "p95", "p99", f"p{extra:g}"]
        return dict.fromkeys(keys)
    values = np.sort(latencies_ns) / 1e3  # us
    out: dict[str, float | None] = {
        "avg": float(values.mean()),
        "min": float(values[0]),
        "max": float(values[-1]),
    }
    for p in (50, 90, 95, 99, extra):
        out[f"p{p:g}"] = percentile(values, p)
    return out


def summarize_level(spec: LevelSpec, batch_size: int, status: str, windows: list[Window], totals: Totals,
                    server_total: ServerStats | None, percentile_value: float) -> LevelResult:
    """A level's numbers from its last (up to three) windows, merged."""
    measured = windows[-STABLE_WINDOWS:]
    duration = sum(w.duration for w in measured)
    sent = sum(w.sent for w in measured)
    ok = sum(w.ok for w in measured)
    errors = sum(w.errors for w in measured)
    late = sum(w.late for w in measured)
    delay = sum(w.send_delay_ns for w in measured)
    lat = np.concatenate([w.latencies_ns for w in measured]) if measured else np.empty(0, np.int64)
    server = None
    if measured and all(w.server is not None for w in measured):
        delta = measured[0].server
        for w in measured[1:]:
            delta = delta + w.server
        server = delta.as_dict()
    first_error = next((w.first_error for w in measured if w.first_error), None) or totals.first_error
    return LevelResult(
        mode=spec.mode,
        value=spec.value,
        batch_size=batch_size,
        status=status,
        windows=[w.summary(batch_size) for w in windows],
        measured_windows=len(measured),
        duration_s=duration,
        sent=sent,
        completed=ok,
        errors=errors,
        throughput=ok * batch_size / duration if duration > 0 else 0.0,
        request_throughput=ok / duration if duration > 0 else 0.0,
        send_rate=sent / duration if duration > 0 else 0.0,
        late=late,
        avg_send_delay_us=(delay / sent / 1e3) if (spec.mode == "rate" and sent) else None,
        latency_us=_latency_summary(lat, percentile_value),
        percentile=percentile_value,
        first_error=first_error,
        server=server,
        total_sent=totals.sent,
        total_completed=totals.ok,
        total_errors=totals.errors,
        server_total=server_total.as_dict() if server_total is not None else None,
    )


# --------------------------------------------------------------------------------------
# Load generation in one process
# --------------------------------------------------------------------------------------


@dataclass
class GeneratorConfig:
    """Everything a generator needs; picklable (sent to worker processes)."""

    protocol: str  # http | grpc
    host: str
    port: int
    model: str
    version: str
    #: Encoded requests, used round-robin. HTTP: complete request bytes; gRPC: serialized ModelInferRequest.
    requests: list[bytes]
    interval: float  # measurement window, seconds
    max_trials: int
    distribution: str = "constant"
    timeout: float = DEFAULT_TIMEOUT
    seed: int = 0
    #: gRPC load client: ``inferstack`` (perf/grpc_h2.py) or ``grpcio`` (grpc.aio).
    grpc_client: str = "inferstack"


class LoadGenerator:
    """Closed- or open-loop load from one event loop, cut into windows on a shared time grid."""

    def __init__(self, config: GeneratorConfig, index: int = 0, count: int = 1) -> None:
        self.config = config
        self.index, self.count = index, count
        self._grpc: GrpcClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._inflight: set[asyncio.Task] = set()
        self._idle: list[RawConnection] = []
        self._conns: list[RawConnection] = []
        self._windows: asyncio.Queue[Window] = asyncio.Queue()
        self._stopping = False
        self._emitted = Totals()
        self._reset()

    # -- recording ----------------------------------------------------------------------

    def _reset(self) -> None:
        self._lat: list[int] = []
        self._sent = self._ok = self._err = self._late = self._delay = 0
        self._first_error: str | None = None

    def _swap(self, index: int, duration: float) -> Window:
        w = Window(index=index, duration=duration, sent=self._sent, ok=self._ok, errors=self._err,
                   late=self._late, send_delay_ns=self._delay,
                   latencies_ns=np.asarray(self._lat, dtype=np.int64), first_error=self._first_error)
        self._reset()
        return w

    def _record(self, latency_ns: int, error: str | None) -> None:
        if error is None:
            self._lat.append(latency_ns)
            self._ok += 1
        else:
            self._err += 1
            if self._first_error is None:
                self._first_error = error

    # -- transports ---------------------------------------------------------------------

    def _sender(self) -> Callable[[bytes], Awaitable[str | None]]:
        """A send function for one closed-loop slot (HTTP: its own keep-alive connection)."""
        if self.config.protocol == "grpc":
            assert self._grpc is not None
            return self._grpc.infer
        conn = RawConnection(self.config.host, self.config.port, self.config.timeout)
        self._conns.append(conn)

        def send(data: bytes) -> Awaitable[str | None]:
            return http_infer(conn, data)

        return send

    async def _send_pooled(self, data: bytes) -> str | None:
        if self.config.protocol == "grpc":
            assert self._grpc is not None
            return await self._grpc.infer(data)
        conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = RawConnection(self.config.host, self.config.port, self.config.timeout)
            self._conns.append(conn)
        try:
            return await http_infer(conn, data)
        finally:
            self._idle.append(conn)

    # -- levels -------------------------------------------------------------------------

    async def start(self, spec: LevelSpec, share: float, t0: float, level: int = 0) -> None:
        """Start a level at monotonic time ``t0`` with this generator's share of it
        (concurrency slots, or requests per second)."""
        if self.config.protocol == "grpc" and self._grpc is None:
            self._grpc = GrpcClient(self.config.host, self.config.port, self.config.model,
                                    self.config.version, self.config.timeout,
                                    implementation=self.config.grpc_client)
        self._stopping = False
        self._emitted = Totals()
        self._reset()
        self._windows = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._window_clock(t0))]
        if spec.mode == "concurrency":
            slots = int(share)
            self._tasks += [asyncio.create_task(self._closed_slot(self._sender(), t0, self.index + i * self.count))
                            for i in range(slots)]
        elif share > 0:
            rng = np.random.default_rng([self.config.seed, level, self.index])
            # Enough schedule for every window the controller may ask for, and then some.
            horizon = (self.config.max_trials + 2) * self.config.interval + 5.0
            # Constant rate split over N generators: offset each one so the merged sends stay evenly spaced.
            phase = self.index / spec.value if self.config.distribution == "constant" else 0.0
            schedule = make_schedule(share, horizon, self.config.distribution, rng, phase)
            late_after = max(1.0 / spec.value, TIMER_SLACK)
            self._tasks.append(asyncio.create_task(self._open_loop(schedule, t0, late_after)))

    async def next_window(self) -> Window:
        return await self._windows.get()

    async def stop(self) -> Totals:
        """Stop sending, wait for the requests in flight, close connections; the level's totals."""
        self._stopping = True
        clock, workers = self._tasks[0], self._tasks[1:]
        clock.cancel()
        await asyncio.gather(clock, return_exceptions=True)
        pending = [t for t in workers if not t.done()] + list(self._inflight)
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.config.timeout + 5)
            for t in still:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        rest = self._swap(-1, 0.0)
        totals = Totals(self._emitted.sent, self._emitted.ok, self._emitted.errors, self._emitted.first_error)
        totals.add(Totals(rest.sent, rest.ok, rest.errors, rest.first_error))
        for conn in self._conns:
            await conn.close()
        self._conns, self._idle, self._tasks = [], [], []
        self._inflight.clear()
        return totals

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def _window_clock(self, t0: float) -> None:
        interval = self.config.interval
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        start = time.monotonic()
        k = 0
        while True:
            end = t0 + (k + 1) * interval
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            now = time.monotonic()
            w = self._swap(k, now - start)
            self._emitted.add(Totals(w.sent, w.ok, w.errors, w.first_error))
            self._windows.put_nowait(w)
            start = now
            k += 1

    async def _closed_slot(self, send: Callable[[bytes], Awaitable[str | None]], t0: float, offset: int) -> None:
        requests = self.config.requests
        n = len(requests)
        i = offset % n
        clock = time.monotonic_ns
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        while not self._stopping:
            data = requests[i]
            i = i + 1 if i + 1 < n else 0
            self._sent += 1
            begin = clock()
            error = await send(data)
            self._record(clock() - begin, error)
            if error is not None:
                await asyncio.sleep(ERROR_PAUSE)

    async def _open_loop(self, schedule: np.ndarray, t0: float, late_after: float) -> None:
        requests = self.config.requests
        n = len(requests)
        limit = asyncio.Semaphore(MAX_OUTSTANDING)
        base_ns = int(t0 * 1e9)
        due_ns = (schedule * 1e9).astype(np.int64) + base_ns
        late_ns = int(late_after * 1e9)
        clock = time.monotonic_ns
        inflight = self._inflight

        async def one(k: int, due: int) -> None:
            async with limit:
                if self._stopping:
                    return  # never sent: the level ended while it waited for a slot
                begin = clock()
                delay = begin - due
                if delay > late_ns:
                    self._late += 1
                self._sent += 1
                if delay > 0:
                    self._delay += delay
                error = await self._send_pooled(requests[k % n])
                # Measured from the scheduled time when it left late (no coordinated omission).
                self._record(clock() - min(due, begin), error)

        total = len(due_ns)
        slack_ns = int(TIMER_SLACK * 1e9)
        i = 0
        while i < total and not self._stopping:
            now = clock()
            while i < total and due_ns[i] <= now + slack_ns:
                task = asyncio.create_task(one(i, int(due_ns[i])))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                i += 1
            if i < total:
                wait = (int(due_ns[i]) - now) / 1e9 - TIMER_SLACK / 2
                await asyncio.sleep(max(wait, TIMER_SLACK))


# --------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------


def split_share(spec: LevelSpec, workers: int) -> list[float]:
    """Each worker's part of a level: concurrency slots (integers summing to it) or a rate."""
    if spec.mode == "concurrency":
        c = int(spec.value)
        return [c // workers + (1 if i < c % workers else 0) for i in range(workers)]
    return [spec.value / workers] * workers


def _worker_main(config: GeneratorConfig, index: int, count: int, commands: Any, results: Any) -> None:
    """Entry point of a worker process: runs a LoadGenerator on commands from the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us

    async def main() -> None:
        gen = LoadGenerator(config, index, count)
        results.send(("ready", None, None))
        loop = asyncio.get_running_loop()
        forward: asyncio.Task | None = None

        async def forward_windows(level: int) -> None:
            while True:
                w = await gen.next_window()
                results.send(("window", level, w))

        while True:
            command, level, args = await loop.run_in_executor(None, commands.recv)
            if command == "start":
                spec, share, t0 = args
                await gen.start(spec, share, t0, level)
                forward = asyncio.create_task(forward_windows(level))
            elif command == "stop":
                if forward is not None:
                    forward.cancel()
                    await asyncio.gather(forward, return_exceptions=True)
                    forward = None
                results.send(("totals", level, await gen.stop()))
            elif command == "close":
                await gen.close()
                return

    try:
        _run(main())
    except Exception:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(Exception):
            results.send(("error", None, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            results.close()


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


class ProcessPool:
    """``count`` LoadGenerators in spawned processes, driven like one."""

    def __init__(self, config: GeneratorConfig, count: int, start_timeout: float = 120.0) -> None:
        self.config, self.count, self.start_timeout = config, count, start_timeout
        self._procs: list[Any] = []
        self._commands: list[Any] = []
        self._inbox: list[asyncio.Queue] = []
        self._threads: list[threading.Thread] = []
        self._level = 0

    async def open(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        for i in range(self.count):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            res_recv, res_send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(self.config, i, self.count, cmd_recv, res_send),
                               name=f"inferstack-perf-worker-{i}", daemon=True)
            proc.start()
            cmd_recv.close()
            res_send.close()
            inbox: asyncio.Queue = asyncio.Queue()
            thread = threading.Thread(target=self._read, args=(res_recv, inbox, loop), daemon=True)
            thread.start()
            self._procs.append(proc)
            self._commands.append(cmd_send)
            self._inbox.append(inbox)
            self._threads.append(thread)
        for i in range(self.count):
            await self._expect(i, "ready", None, self.start_timeout)

    @staticmethod
    def _read(conn: Any, inbox: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("exit", None, None)
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, message)
            except RuntimeError:  # loop closed
                return
            if message[0] in ("exit", "error"):
                return

    async def _expect(self, i: int, kind: str, level: int | None, timeout: float | None = None) -> Any:
        while True:
            try:
                message = await asyncio.wait_for(self._inbox[i].get(), timeout)
            except TimeoutError:
                raise PerfSetupError(f"perf worker {i} did not answer within {timeout:g} s") from None
            what, lvl, payload = message
            if what == "error":
                raise PerfSetupError(f"perf worker {i} failed:\n{payload}")
            if what == "exit":
                raise PerfSetupError(f"perf worker {i} exited unexpectedly (exit code {self._procs[i].exitcode})")
            if what == kind and lvl == level:
                return payload
            # stale messages (windows of a level already stopped) are dropped

    def _send(self, i: int, message: tuple) -> None:
        try:
            self._commands[i].send(message)
        except (OSError, ValueError):
            raise PerfSetupError(f"perf worker {i} is gone (exit code {self._procs[i].exitcode})") from None

    async def start(self, spec: LevelSpec, share: float, t0: float, level: int = 0) -> None:
        self._level = level
        for i, part in enumerate(split_share(spec, self.count)):
            self._send(i, ("start", level, (spec, part, t0)))

    async def next_window(self) -> Window:
        parts = [await self._expect(i, "window", self._level) for i in range(self.count)]
        return Window.merge_parallel(parts)

    async def stop(self) -> Totals:
        for i in range(self.count):
            self._send(i, ("stop", self._level, None))
        totals = Totals()
        for i in range(self.count):
            totals.add(await self._expect(i, "totals", self._level, self.config.timeout + 30))
        return totals

    async def close(self) -> None:
        for i in range(len(self._procs)):
            with contextlib.suppress(Exception):
                self._commands[i].send(("close", None, None))
        deadline = time.monotonic() + 10
        for proc in self._procs:
            await asyncio.to_thread(proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        for conn in self._commands:
            with contextlib.suppress(Exception):
                conn.close()
        self._procs = []


# --------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    batch_size: int
    interval: float  # seconds
    stability_percentage: float = 10.0
    max_trials: int = 10
    percentile: float = 95.0
    #: Sleep this long before a level's first window (lets workers receive the command).
    lead: float = 0.05


WindowCallback = Callable[[LevelSpec, list[Window], str], None]


class Controller:
    """Runs levels on a generator (in-process or a ProcessPool) and turns windows into results."""

    def __init__(self, generator: Any, settings: EngineSettings,
                 stats: Callable[[], Awaitable[ServerStats | None]] | None = None,
                 on_window: WindowCallback | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self._stats = stats
        self.on_window = on_window
        self._level = 0

    async def _snapshot(self) -> ServerStats | None:
        if self._stats is None:
            return None
        snap = await self._stats()
        if snap is None:
            self._stats = None  # no statistics extension: stop asking
        return snap

    async def run_level(self, spec: LevelSpec) -> LevelResult:
        s = self.settings
        self._level += 1
        begin = await self._snapshot()
        t0 = time.monotonic() + s.lead
        await self.generator.start(spec, spec.value, t0, self._level)
        windows: list[Window] = []
        status = "unstable"
        previous = begin
        try:
            while True:
                w = await self.generator.next_window()
                snap = await self._snapshot()
                if snap is not None and previous is not None:
                    w.server = snap - previous
                previous = snap
                windows.append(w)
                if w.ok == 0 and w.errors > 0:
                    status = "failed"
                elif is_stable([x.throughput(s.batch_size) for x in windows], s.stability_percentage):
                    status = "stable"
                elif len(windows) >= s.max_trials:
                    status = "unstable"
                else:
                    status = "measuring"
                if self.on_window is not None:
                    self.on_window(spec, windows, status)
                if status != "measuring":
                    break
        finally:
            totals = await self.generator.stop()
        end = await self._snapshot()
        server_total = end - begin if (end is not None and begin is not None) else None
        return summarize_level(spec, s.batch_size, status, windows, totals, server_total, s.percentile)


__all__ = [
    "Controller", "EngineSettings", "GeneratorConfig", "LevelResult", "LevelSpec", "LoadGenerator",
    "ProcessPool", "Totals", "Window", "is_stable", "make_schedule", "parse_range", "percentile",
    "split_share", "summarize_level",
]
