"""The gateway process: replica polling, HTTP (uvicorn), gRPC proxy, metrics; graceful shutdown.

On SIGTERM/SIGINT readiness turns false (a load balancer in front stops
sending), HTTP stops accepting and lets in-flight requests finish (bounded by
``exit_timeout_s``), gRPC does the same, pending shadow copies get a moment
to finish, then polling stops and connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from inferstack.gateway.config import GatewayConfig
from inferstack.gateway.grpc import GrpcProxy, create_grpc_server
from inferstack.gateway.http import GatewayHttpApp
from inferstack.gateway.routing import Gateway

log = logging.getLogger("inferstack.gateway")


class _UvicornServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: GatewayConfig) -> int:
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_shutdown() -> None:
        if not stop.is_set():
            log.info("shutting down: draining in-flight requests")
            gateway.draining = True
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, request_shutdown)

    metrics_server = None
    if config.allow_metrics:
        from prometheus_client import start_http_server

        try:
            metrics_server, _ = start_http_server(config.metrics_port, config.host, registry=gateway.metrics.registry)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", config.host, config.metrics_port, exc)
            return 1

    await gateway.pool.start()
    proxy = GrpcProxy(gateway, config.max_request_bytes)
    grpc_server = None
    if config.allow_grpc:
        tls = (config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        try:
            grpc_server, bound = create_grpc_server(proxy, config.host, config.grpc_port,
                                                    max_message_bytes=config.max_request_bytes, tls=tls)
            await grpc_server.start()
        except (OSError, RuntimeError) as exc:
            log.error("cannot serve gRPC on %s:%d: %s", config.host, config.grpc_port, exc)
            await gateway.pool.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
            return 1
        log.info("gRPC on %s:%d", config.host, bound)

    http = _UvicornServer(uvicorn.Config(
        GatewayHttpApp(gateway), host=config.host, port=config.http_port, http="httptools", lifespan="off",
        log_config=None, access_log=False, timeout_graceful_shutdown=max(1, int(config.exit_timeout_s)),
        timeout_keep_alive=75, ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
        proxy_headers=False, server_header=False, date_header=False,
    ))
    http_task = loop.create_task(_serve_http(http), name="http")
    stop_task = loop.create_task(stop.wait())
    log.info("gateway on %s:%d over %d replica(s)%s", config.host, config.http_port, len(gateway.pool.replicas),
             f" + DNS {', '.join(d.name for d in config.dns)}" if config.dns else "")
    exit_code = 0
    grpc_stopping = None
    try:
        done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task in done:
            exit_code = http_task.result() or 1
            log.error("HTTP server stopped unexpectedly; shutting down")
        else:
            http.should_exit = True
            if grpc_server is not None:
                grpc_stopping = loop.create_task(grpc_server.stop(config.exit_timeout_s))
            exit_code = await http_task
    finally:
        if grpc_server is not None:
            if grpc_stopping is None:
                grpc_stopping = loop.create_task(grpc_server.stop(0))
            with contextlib.suppress(BaseException):
                await grpc_stopping
        stop_task.cancel()
        if gateway.shadow_tasks:
            await asyncio.wait(set(gateway.shadow_tasks), timeout=min(5.0, config.exit_timeout_s))
        await proxy.close()
        await gateway.pool.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    log.info("stopped")
    return exit_code


async def _serve_http(http: uvicorn.Server) -> int:
    try:
        await http.serve()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    return 0


def run_gateway(config: GatewayConfig) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config))
