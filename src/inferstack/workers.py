"""``inferstack serve --workers N``: several server processes sharing one set of ports.

One Python process serves HTTP and gRPC from one event loop, and that loop
saturates long before the cores do for small models (the MLP spends ~250 µs of
loop CPU per request and ~5 µs in ONNX Runtime). N worker processes, each a
complete server with its own copy of the models, bind the HTTP and gRPC ports
with SO_REUSEPORT, so the kernel spreads connections between them.

The supervisor (this module, the parent process) loads no model. It

- starts the workers (``spawn``: no state inherited from the parent),
- restarts one that dies, with a growing back-off (the new one opens the ports only
  once its models are loaded, so the others keep serving meanwhile), and gives up
  when workers keep dying during start-up (a bad repository or a taken port),
- on SIGTERM/SIGINT passes the signal on and waits for every worker to drain,
- serves the public metrics port: each worker exposes its metrics on a loopback
  port of its own and a scrape of the public port merges them (counters and
  histograms summed, ``model_ready`` the minimum — ready only when every worker
  is), plus ``inferstack_workers`` and ``inferstack_worker_restarts``.

What stays per process, and is therefore refused with more than one worker:
explicit model control (a load or unload would reach one worker only) and client
shared memory (a region registered on one worker is unknown to the others).
Poll mode is fine: every worker watches the repository itself. Statistics
(``/v2/models/stats``) answer for the worker the connection landed on; the
metrics port is the whole-server view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from inferstack.observability.metrics import PREFIX, start_metrics_server
from inferstack.server import ServerSettings

log = logging.getLogger("inferstack.workers")

#: Gauges merged with min() (true only when true in every worker); other gauges are summed.
_MIN_GAUGES = {f"{PREFIX}_model_ready"}
#: Gauges merged with max() (the same quantity measured in each worker).
_MAX_GAUGES = {f"{PREFIX}_model_load_seconds"}
#: A worker that dies this soon after starting counts as a start-up failure.
_EARLY_EXIT_SECS = 10.0
#: Consecutive start-up failures after which the supervisor gives up.
_MAX_EARLY_FAILURES = 3


def check_worker_settings(settings: ServerSettings, workers: int) -> str | None:
    """Why these settings cannot run in ``workers`` processes, or None when they can."""
    if workers <= 1:
        return None
    if settings.model_control_mode == "explicit":
        return ("--model-control-mode explicit cannot be used with --workers > 1: a load or unload request "
                "would reach only the worker that received it (use none or poll)")
    if settings.allow_client_shm:
        return ("--allow-client-shm cannot be used with --workers > 1: a shared-memory region registered "
                "on one worker is unknown to the others")
    return None


def run_workers(settings: ServerSettings, workers: int, *, log_level: str = "info", log_format: str = "text") -> int:
    """Run ``workers`` server processes on the settings' ports until SIGTERM/SIGINT."""
    problem = check_worker_settings(settings, workers)
    if problem:
        log.error("%s", problem)
        return 2
    supervisor = Supervisor(settings, workers, log_level=log_level, log_format=log_format)
    return supervisor.run()


@dataclasses.dataclass(slots=True)
class _Worker:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    started: float
    metrics_port: int | None = None
    metrics_conn: Connection | None = None


class Supervisor:
    """Starts, watches, restarts and stops the worker processes."""

    def __init__(self, settings: ServerSettings, workers: int, *, log_level: str, log_format: str) -> None:
        self.settings = settings
        self.count = workers
        self.log_level = log_level
        self.log_format = log_format
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.restarts = 0

    # -- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        metrics_server = None
        try:
            if self.settings.allow_metrics:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(_MergedWorkerMetrics(self))
                try:
                    metrics_server = start_metrics_server(registry, self.settings.host, self.settings.metrics_port)
                except OSError as exc:
                    log.error("cannot serve metrics on %s:%d: %s", self.settings.host, self.settings.metrics_port, exc)
                    return 1
            for index in range(self.count):
                self._start(index)
            log.info("supervising %d worker processes (HTTP %d, gRPC %d, metrics %d)", self.count,
                     self.settings.http_port, self.settings.grpc_port, self.settings.metrics_port)
            return self._watch()
        finally:
            self._stop_all()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping the workers", signal.Signals(signum).name)
            self._stop.set()

    def _start(self, index: int, *, restart: bool = False) -> None:
        settings = dataclasses.replace(
            self.settings, reuse_port=True, metrics_host="127.0.0.1", metrics_port=0, listen_after_load=restart
        )
        if not settings.jobs_redis_url:
            settings.jobs_unavailable_reason = (
                "async jobs with serve --workers > 1 need a shared queue: start the server with --jobs-redis-url "
                "(an in-process queue would be split between the worker processes)"
            )
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(settings, index, self.count, sender, self.log_level, self.log_format),
            name=f"inferstack-worker-{index}",
            daemon=False,
        )
        process.start()
        sender.close()
        with self._lock:
            self._workers[index] = _Worker(index, process, time.monotonic(), metrics_conn=receiver)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _watch(self) -> int:
        early_failures = 0
        backoff = 1.0
        while not self._stop.wait(0.2):
            for worker in list(self._workers.values()):
                if worker.process.is_alive():
                    if time.monotonic() - worker.started > _EARLY_EXIT_SECS:
                        early_failures, backoff = 0, 1.0
                    continue
                code = worker.process.exitcode
                lived = time.monotonic() - worker.started
                log.error("worker %d (pid %d) exited with %s after %.1fs", worker.index, worker.process.pid,
                          _describe_exit(code), lived)
                if lived < _EARLY_EXIT_SECS:
                    early_failures += 1
                    if early_failures >= _MAX_EARLY_FAILURES:
                        log.error("workers keep failing at start-up; giving up (see the errors above)")
                        return 1
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 30.0)
                self.restarts += 1
                self._start(worker.index, restart=True)
        return 0

    def _stop_all(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.exit_timeout_secs + 15
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join(5)
            if worker.metrics_conn is not None:
                worker.metrics_conn.close()

    # -- metrics ----------------------------------------------------------------------

    def worker_metrics_ports(self) -> Iterator[tuple[int, int]]:
        """(worker index, loopback metrics port) of every live worker that reported one."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            if worker.metrics_port is None and worker.metrics_conn is not None:
                with contextlib.suppress(EOFError, OSError):
                    if worker.metrics_conn.poll():
                        worker.metrics_port = worker.metrics_conn.recv()
            if worker.metrics_port is not None and worker.process.is_alive():
                yield worker.index, worker.metrics_port

    def live_workers(self) -> list[tuple[int, int]]:
        with self._lock:
            return [(w.index, w.process.pid) for w in self._workers.values() if w.process.is_alive()]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _worker_main(settings: ServerSettings, index: int, count: int, metrics_conn: Connection,
                 log_level: str, log_format: str) -> None:
    """Entry point of one worker process: a complete server on the shared ports."""
    import sys

    from inferstack.observability.logs import setup_logging
    from inferstack.server import run_server

    os.environ["INFERSTACK_WORKER_PROCESSES"] = str(count)
    setup_logging(log_level, log_format)
    logging.getLogger("inferstack").info("worker %d of %d (pid %d)", index, count, os.getpid())

    def report(port: int) -> None:
        with contextlib.suppress(OSError):
            metrics_conn.send(port)
            metrics_conn.close()

    sys.exit(run_server(settings, on_metrics_bound=report))


class _MergedWorkerMetrics:
    """A collector that scrapes every worker's loopback metrics port and merges the families."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        texts = []
        for index, port in self.supervisor.worker_metrics_ports():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    texts.append(response.read().decode())
            except OSError as exc:
                log.warning("metrics of worker %d unavailable: %s", index, exc)
        yield from merge_expositions(texts)
        workers = Metric(f"{PREFIX}_workers", "Live worker processes (serve --workers).", "gauge")
        live = self.supervisor.live_workers()
        workers.add_sample(f"{PREFIX}_workers", {}, float(len(live)))
        yield workers
        info = Metric(f"{PREFIX}_worker", "One series per live worker process, labelled with its pid.", "gauge")
        for index, pid in live:
            info.add_sample(f"{PREFIX}_worker", {"worker": str(index), "pid": str(pid)}, 1.0)
        yield info
        restarts = Metric(f"{PREFIX}_worker_restarts", "Worker processes restarted after dying.", "counter")
        restarts.add_sample(f"{PREFIX}_worker_restarts_total", {}, float(self.supervisor.restarts))
        yield restarts


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """Merge Prometheus text expositions of identical processes into one set of families.

    Counters, histograms and summaries add up; gauges add up too (queue depth,
    requests in flight, cache bytes), except ``model_ready`` (minimum) and
    ``model_load_seconds`` (maximum). ``_created`` samples are dropped: a sum of
    creation times means nothing.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif family.name in _MIN_GAUGES:
                    samples[key] = min(samples[key], sample.value)
                elif family.name in _MAX_GAUGES:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())
