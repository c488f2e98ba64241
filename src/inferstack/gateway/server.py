"""The gateway process: replica polling, HTTP (``httpserver``), gRPC proxy, metrics; graceful shutdown.

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
import ssl

from inferstack.gateway.config import GatewayConfig
from inferstack.gateway.grpc import GrpcProxy, create_grpc_server
from inferstack.gateway.http import GatewayHttpApp
from inferstack.gateway.httpserver import HttpServer
from inferstack.gateway.routing import Gateway

log = logging.getLogger("inferstack.gateway")


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

    http = HttpServer(GatewayHttpApp(gateway), max_body=config.max_request_bytes)
    ssl_context = None
    if config.tls_cert and config.tls_key:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    try:
        bound_http = await http.start(config.host, config.http_port, ssl_context)
    except OSError as exc:
        log.error("cannot serve HTTP on %s:%d: %s", config.host, config.http_port, exc)
        if grpc_server is not None:
            await grpc_server.stop(0)
        await proxy.close()
        await gateway.pool.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        return 1
    log.info("gateway on %s:%d%s over %d replica(s)%s", config.host, bound_http, " (TLS)" if ssl_context else "",
             len(gateway.pool.replicas), f" + DNS {', '.join(d.name for d in config.dns)}" if config.dns else "")
    try:
        await stop.wait()
        grpc_stopping = None
        if grpc_server is not None:
            grpc_stopping = loop.create_task(grpc_server.stop(config.exit_timeout_s))
        await http.shutdown(config.exit_timeout_s)
        if grpc_stopping is not None:
            with contextlib.suppress(BaseException):
                await grpc_stopping
    finally:
        if gateway.shadow_tasks:
            await asyncio.wait(set(gateway.shadow_tasks), timeout=min(5.0, config.exit_timeout_s))
        await proxy.close()
        await gateway.pool.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    log.info("stopped")
    return 0


def run_gateway(config: GatewayConfig) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config))
