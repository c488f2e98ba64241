"""The server process: wires the serving core to its transports and runs them.

One asyncio event loop (uvloop) serves HTTP and gRPC (our HTTP/2 server, or ``grpc.aio``); Prometheus metrics are served
from their own thread on their own port; models load in the background so
liveness answers at once and readiness turns true when the models meant to
load are READY (what Kubernetes startup and readiness probes want).

Shutdown on SIGTERM or SIGINT: readiness goes false, the HTTP server stops
accepting and lets in-flight requests finish (bounded by
``exit_timeout``), then every model drains and unloads, and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from inferstack.jobs.queue import QueueSettings
from inferstack.jobs.service import JobsConfig, JobService
from inferstack.observability.metrics import create_registry, start_metrics_server
from inferstack.protocol.shared_memory import SystemSharedMemory
from inferstack.serving import ModelManager, ServerOptions
from inferstack.serving.cache import create_cache
from inferstack.serving.watcher import RepositoryWatcher
from inferstack.transports.grpc import GrpcService, start_grpc_server
from inferstack.transports.sockets import reuse_port_socket
from inferstack.transports.http import EXTENSIONS, HttpApi, create_app

log = logging.getLogger("inferstack.server")


@dataclass(slots=True)
class ServerSettings:
    """Everything ``inferstack serve`` can be told (see docs/configuration.md)."""

    model_repository: Path
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    allow_metrics: bool = True
    #: Triton's --allow-client-shm: register and use client system shared memory regions.
    allow_client_shm: bool = False
    allow_grpc: bool = True
    grpc_max_message_bytes: int = 128 * 1024 * 1024
    #: Which server carries gRPC: ``inferstack`` (our own HTTP/2, transports/grpc_h2.py) or ``grpcio`` (grpc.aio).
    grpc_server: str = "inferstack"
    model_control_mode: str = "none"
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    strict_model_config: bool = False
    strict_readiness: bool = True
    max_request_bytes: int = 128 * 1024 * 1024
    max_queue_size: int = 1024
    http_max_concurrency: int = 2048
    exit_timeout_secs: float = 30.0
    #: Triton's ``--cache-config`` values (``local,size=BYTES``); empty: no response cache.
    cache_config: list[str] = field(default_factory=list)
    #: Bind HTTP and gRPC with SO_REUSEPORT so several worker processes share the ports
    #: (``serve --workers N``; the kernel spreads connections between them).
    reuse_port: bool = False
    #: Address of the metrics port; empty: ``host``. Workers bind theirs on loopback
    #: and the supervisor serves the merged view on the public port.
    metrics_host: str = ""
    #: Raise the garbage collector's thresholds and freeze what startup allocated
    #: (the per-request allocations otherwise set off a collection every few requests).
    gc_tuning: bool = True
    #: Load the startup models before opening the HTTP and gRPC ports. The supervisor
    #: sets it for a restarted worker, so connections the kernel hands it find its
    #: models READY while the other workers keep serving.
    listen_after_load: bool = False
    #: Async jobs: Redis URL of the queue (None: in-process queue), and its settings (docs/async.md).
    jobs_redis_url: str | None = None
    jobs_queue_prefix: str = "inferstack:jobs"
    #: Embedded job worker slots; None: 4 with the in-process queue, 0 with Redis.
    job_workers: int | None = None
    webhook_secret: str | None = None
    job_result_ttl: float = 3600.0
    job_max_attempts: int = 3
    job_visibility_timeout: float = 60.0
    #: Why this process serves no async jobs (set by ``serve --workers`` without Redis).
    jobs_unavailable_reason: str | None = None

    def manager_options(self) -> ServerOptions:
        return ServerOptions(
            model_repository=self.model_repository,
            model_control_mode=self.model_control_mode,
            startup_models=list(self.load_models),
            strict_model_config=self.strict_model_config,
            strict_readiness=self.strict_readiness,
            max_queue_size=self.max_queue_size,
            unload_timeout=self.exit_timeout_secs,
            response_cache=create_cache(self.cache_config),
        )


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the InferenceServer owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InferenceServer:
    def __init__(self, settings: ServerSettings, *, on_metrics_bound: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        #: Told the metrics port once it is bound (the supervisor of ``--workers`` uses it).
        self.on_metrics_bound = on_metrics_bound
        self.manager = ModelManager(settings.manager_options())
        self.shared_memory = SystemSharedMemory(enabled=settings.allow_client_shm)
        self.http_api = HttpApi(
            self.manager, max_body_bytes=settings.max_request_bytes, shared_memory=self.shared_memory
        )
        self.grpc_service = GrpcService(self.manager, extensions=EXTENSIONS, shared_memory=self.shared_memory)
        self.jobs = JobService(JobsConfig(
            redis_url=settings.jobs_redis_url, queue_prefix=settings.jobs_queue_prefix, workers=settings.job_workers,
            webhook_secret=settings.webhook_secret,
            settings=QueueSettings(result_ttl=settings.job_result_ttl, max_attempts=settings.job_max_attempts,
                                   visibility_timeout=settings.job_visibility_timeout),
            unavailable_reason=settings.jobs_unavailable_reason,
        ), self.manager)
        self.http_api.extra_routes += self.jobs.routes(self.http_api)
        self._stop = asyncio.Event()

    def request_shutdown(self) -> None:
        if not self._stop.is_set():
            log.info("shutting down: draining in-flight requests")
            self.http_api.draining = True
            self.grpc_service.draining = True
            self._stop.set()

    async def run(self) -> int:
        """Serve until a signal arrives; returns the process exit code."""
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_shutdown)

        watcher = None
        if s.model_control_mode == "poll":
            # The baseline is taken before the startup load reads the repository,
            # so the first scan sees whatever changed while models were loading.
            watcher = RepositoryWatcher(self.manager, s.repository_poll_secs)
            await watcher.baseline()
        if s.gc_tuning:
            _tune_gc()
        metrics_server = None
        if s.allow_metrics:
            metrics_host = s.metrics_host or s.host
            try:
                registry = create_registry(self.manager, self.http_api.responses)
                registry.register(self.jobs.collector())
                metrics_server = start_metrics_server(registry, metrics_host, s.metrics_port)
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", metrics_host, s.metrics_port, exc)
                return 1
            if self.on_metrics_bound is not None:
                self.on_metrics_bound(metrics_server.server_port)

        loaded_before_listening = False
        if s.listen_after_load:
            await self._load_startup_models()
            loaded_before_listening = True
        grpc_server = None
        if s.allow_grpc:
            try:
                grpc_server, bound = await start_grpc_server(
                    self.grpc_service, s.host, s.grpc_port, max_message_bytes=s.grpc_max_message_bytes,
                    reuse_port=s.reuse_port, implementation=s.grpc_server,
                )
            except (OSError, RuntimeError) as exc:
                log.error("cannot serve gRPC on %s:%d: %s", s.host, s.grpc_port, exc)
                if metrics_server is not None:
                    metrics_server.shutdown()
                return 1
            log.info("gRPC on %s:%d (%s server)", s.host, bound, s.grpc_server)

        http = _UvicornServer(
            uvicorn.Config(
                create_app(self.http_api),
                host=s.host,
                port=s.http_port,
                http="httptools",
                lifespan="off",
                log_config=None,
                access_log=False,
                limit_concurrency=s.http_max_concurrency or None,
                timeout_graceful_shutdown=max(1, int(s.exit_timeout_secs)),
                timeout_keep_alive=75,
            )
        )
        sockets = None
        if s.reuse_port:
            try:
                sockets = [reuse_port_socket(s.host, s.http_port)]
            except OSError as exc:
                log.error("cannot serve HTTP on %s:%d: %s", s.host, s.http_port, exc)
                if grpc_server is not None:
                    await grpc_server.stop(0)
                if metrics_server is not None:
                    metrics_server.shutdown()
                return 1
        await self.jobs.start()
        http_task = loop.create_task(_serve_http(http, sockets), name="http")
        loading = loop.create_task(
            asyncio.sleep(0) if loaded_before_listening else self._load_startup_models(), name="load-models"
        )
        if watcher is not None:
            watcher.start(after=loading)
        stop_task = loop.create_task(self._stop.wait())
        exit_code = 0
        grpc_stopping: asyncio.Task[None] | None = None
        try:
            done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if http_task in done:
                # uvicorn returned on its own: it could not bind (it logged why).
                exit_code = http_task.result() or 1
                log.error("HTTP server stopped unexpectedly; shutting down")
            else:
                log.info("no longer accepting; waiting up to %.0fs for in-flight requests",
                         s.exit_timeout_secs)
                http.should_exit = True
                if grpc_server is not None:
                    # Refuses new RPCs at once, lets running ones finish within the grace.
                    grpc_stopping = loop.create_task(grpc_server.stop(s.exit_timeout_secs))
                exit_code = await http_task
        finally:
            if grpc_server is not None:
                if grpc_stopping is None:
                    grpc_stopping = loop.create_task(grpc_server.stop(0))
                with contextlib.suppress(BaseException):
                    await grpc_stopping
            stop_task.cancel()
            if watcher is not None:
                await watcher.stop(s.exit_timeout_secs)
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(BaseException):
                    await loading
            await self.jobs.stop(s.exit_timeout_secs)
            await self.manager.shutdown()
            self.shared_memory.unregister()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
        log.info("stopped")
        return exit_code

    async def _load_startup_models(self) -> None:
        await self.manager.load_startup_models()
        if self.settings.gc_tuning:
            # What loading allocated lives as long as the models: move it out of the
            # collector's sight so later collections only walk request garbage.
            gc.collect()
            gc.freeze()


def _tune_gc() -> None:
    """Fewer cyclic-GC passes: each request allocates a few hundred objects, and with
    the default gen-0 threshold (700) a collection ran every few requests (~11% of the
    event loop in profiles; +11-13% req/s on the MLP at c=32 with this setting)."""
    gc.set_threshold(50_000, 50, 100)


async def _serve_http(http: uvicorn.Server, sockets: list[socket.socket] | None = None) -> int:
    """Run uvicorn; its startup failures (``sys.exit`` inside uvicorn) become an exit code.

    A SystemExit escaping a task would stop the event loop and skip our
    shutdown (models unloaded, gRPC and metrics stopped).
    """
    try:
        await http.serve(sockets=sockets)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    return 0


def run_server(settings: ServerSettings, *, on_metrics_bound: Callable[[int], None] | None = None) -> int:
    """Run the server on uvloop (when available) until it is told to stop."""

    async def main() -> int:
        return await InferenceServer(settings, on_metrics_bound=on_metrics_bound).run()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not available on Windows
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
