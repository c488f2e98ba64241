"""The ``inferstack`` command line."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from inferstack import __version__

app = typer.Typer(
    name="inferstack",
    help="Scalable ML inference serving: a Triton-compatible model server.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


class GrpcServerKind(str, Enum):
    """Whose gRPC stack: inferstack's own HTTP/2 code or grpcio (grpc.aio); for serve and for perf's client."""

    inferstack = "inferstack"
    grpcio = "grpcio"


class ControlMode(str, Enum):
    none = "none"
    explicit = "explicit"
    poll = "poll"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"inferstack {__version__}")
        raise typer.Exit()


def _check_cache_config(value: Optional[list[str]]) -> Optional[list[str]]:
    if value:
        from inferstack.serving.cache import CacheConfigError, create_cache

        try:
            create_cache(value)
        except CacheConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _check_redis_url(value: Optional[str]) -> Optional[str]:
    if value:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise typer.BadParameter(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        try:
            import redis  # noqa: F401
        except ImportError:
            raise typer.BadParameter("needs redis-py: pip install 'inferstack[redis]'") from None
    return value


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """inferstack: serve ONNX models over the KServe v2 / Triton protocol."""


@app.command()
def serve(
    model_repository: Annotated[
        Path,
        typer.Option("--model-repository", "--model-store", help="Model repository: REPO/<model>/config.pbtxt and REPO/<model>/<version>/model.onnx.",
                     exists=True, file_okay=False, dir_okay=True, resolve_path=True),
    ],
    host: Annotated[str, typer.Option(help="Address to bind (use 127.0.0.1 for local-only).")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option(help="HTTP/REST port (KServe v2).", min=0, max=65535)] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (KServe v2 GRPCInferenceService).", min=0, max=65535)] = 8001,
    allow_grpc: Annotated[bool, typer.Option("--allow-grpc/--no-allow-grpc", help="Serve gRPC.")] = True,
    grpc_max_message_size: Annotated[int, typer.Option(help="Largest gRPC message in bytes, received or sent (RESOURCE_EXHAUSTED beyond).", min=1)] = 128 * 1024 * 1024,
    grpc_server: Annotated[GrpcServerKind, typer.Option(help="What carries gRPC: inferstack (our own HTTP/2 server, about half the CPU per call) or grpcio (grpc.aio).")] = GrpcServerKind.inferstack,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port.", min=0, max=65535)] = 8002,
    allow_metrics: Annotated[bool, typer.Option("--allow-metrics/--no-allow-metrics", help="Serve Prometheus metrics.")] = True,
    allow_client_shm: Annotated[
        bool,
        typer.Option("--allow-client-shm/--no-allow-client-shm",
                     help="Let clients register system shared memory regions (any /dev/shm object the server may open; trusted clients only)."),
    ] = False,
    model_control_mode: Annotated[
        ControlMode, typer.Option(help="none: load every model at start. explicit: load --load-model names, then load/unload via the API. poll: load every model at start, then load, reload and unload what changes in the repository.")
    ] = ControlMode.none,
    load_model: Annotated[
        Optional[list[str]], typer.Option("--load-model", help="Model to load at start in explicit mode; repeatable; '*' for all.")
    ] = None,
    repository_poll_secs: Annotated[float, typer.Option(help="Poll mode: seconds between repository scans.", min=0.1)] = 15.0,
    strict_model_config: Annotated[
        bool,
        typer.Option("--strict-model-config/--no-strict-model-config", help="Require a complete config.pbtxt (no auto-complete from the model)."),
    ] = False,
    strict_readiness: Annotated[
        bool,
        typer.Option("--strict-readiness/--no-strict-readiness", help="Ready only when every model meant to load is READY."),
    ] = True,
    max_request_size: Annotated[int, typer.Option(help="Largest accepted request body in bytes (413 beyond).", min=1)] = 128 * 1024 * 1024,
    max_queue_size: Annotated[int, typer.Option(help="Queue bound for models whose queue policy sets none (0 = unbounded).", min=0)] = 1024,
    http_max_concurrency: Annotated[int, typer.Option(help="Concurrent HTTP connections+requests before answering 503 (0 = unlimited).", min=0)] = 2048,
    exit_timeout_secs: Annotated[float, typer.Option(help="On SIGTERM, how long to wait for in-flight requests.", min=0)] = 30.0,
    cache_config: Annotated[
        Optional[list[str]],
        typer.Option("--cache-config", callback=_check_cache_config, metavar="local,size=BYTES",
                     help="Response cache for models with response_cache { enable: true }: local,size=BYTES (Triton's syntax), or redis,url=redis://HOST:PORT,ttl=SECONDS shared by replicas."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(help="Server processes sharing the ports (SO_REUSEPORT), each with its own copy of the models; "
                          "the metrics port merges them. Not with explicit model control or client shared memory.",
                     min=1),
    ] = 1,
    jobs_redis_url: Annotated[
        Optional[str], typer.Option(envvar="INFERSTACK_JOBS_REDIS_URL", callback=_check_redis_url, help="Async jobs: Redis URL of the shared job queue (default: an in-process queue).")
    ] = None,
    jobs_queue: Annotated[str, typer.Option(help="Async jobs: key prefix of the Redis queue (servers and workers must agree).")] = "inferstack:jobs",
    job_workers: Annotated[
        Optional[int], typer.Option(help="Async jobs: jobs this server runs at once (default 4 in-process, 0 with Redis: separate workers run them).", min=0)
    ] = None,
    webhook_secret: Annotated[
        Optional[str], typer.Option(envvar="INFERSTACK_WEBHOOK_SECRET", help="Async jobs: HMAC-SHA256 key signing callback_url webhooks (needed to accept callback_url).")
    ] = None,
    job_result_ttl: Annotated[float, typer.Option(help="Async jobs: seconds a finished job's result is kept.", min=1)] = 3600.0,
    job_max_attempts: Annotated[int, typer.Option(help="Async jobs: executions before a job is failed and dead-lettered.", min=1)] = 3,
    job_visibility_timeout: Annotated[float, typer.Option(help="Async jobs: seconds without a worker heartbeat before a job is run elsewhere.", min=0.1)] = 60.0,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option(help="text for people, json (one object per line) for machines.")] = LogFormat.text,
) -> None:
    """Serve a model repository over HTTP and gRPC (KServe v2 + Triton extensions) with Prometheus metrics."""
    from inferstack.observability.logs import setup_logging
    from inferstack.server import ServerSettings, run_server

    setup_logging(log_level.value, log_format.value)
    settings = ServerSettings(
        model_repository=model_repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        allow_metrics=allow_metrics,
        allow_client_shm=allow_client_shm,
        allow_grpc=allow_grpc,
        grpc_max_message_bytes=grpc_max_message_size,
        grpc_server=grpc_server.value,
        model_control_mode=model_control_mode.value,
        load_models=list(load_model or []),
        repository_poll_secs=repository_poll_secs,
        strict_model_config=strict_model_config,
        strict_readiness=strict_readiness,
        max_request_bytes=max_request_size,
        max_queue_size=max_queue_size,
        http_max_concurrency=http_max_concurrency,
        exit_timeout_secs=exit_timeout_secs,
        cache_config=list(cache_config or []),
        jobs_redis_url=jobs_redis_url,
        jobs_queue_prefix=jobs_queue,
        job_workers=job_workers,
        webhook_secret=webhook_secret,
        job_result_ttl=job_result_ttl,
        job_max_attempts=job_max_attempts,
        job_visibility_timeout=job_visibility_timeout,
    )
    if workers > 1:
        from inferstack.workers import check_worker_settings, run_workers

        problem = check_worker_settings(settings, workers)
        if problem:
            raise typer.BadParameter(problem, param_hint="--workers")
        raise typer.Exit(run_workers(settings, workers, log_level=log_level.value, log_format=log_format.value))
    raise typer.Exit(run_server(settings))


class PerfProtocol(str, Enum):
    http = "http"
    grpc = "grpc"


class Distribution(str, Enum):
    constant = "constant"
    poisson = "poisson"


@app.command(no_args_is_help=True)
def perf(
    model_name: Annotated[str, typer.Option("-m", "--model-name", help="Model to measure.")],
    model_version: Annotated[str, typer.Option("-x", "--model-version", help="Version (default: the server's choice).")] = "",
    url: Annotated[Optional[str], typer.Option("-u", "--url", help="host:port of the server (default localhost:8000 for HTTP, localhost:8001 for gRPC).")] = None,
    protocol: Annotated[PerfProtocol, typer.Option("-i", "--protocol", help="http or grpc.")] = PerfProtocol.http,
    binary: Annotated[bool, typer.Option("--binary/--no-binary", help="HTTP: tensors as binary data (Triton's extension) or as JSON.")] = True,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", help="Samples per request.", min=1)] = 1,
    concurrency_range: Annotated[Optional[str], typer.Option(help="START\\[:END\\[:STEP]] requests in flight, END inclusive (closed loop; default 1).")] = None,
    request_rate_range: Annotated[Optional[str], typer.Option(help="START\\[:END\\[:STEP]] requests per second, END inclusive (open loop).")] = None,
    distribution: Annotated[Distribution, typer.Option(help="Open loop: constant or poisson intervals.")] = Distribution.constant,
    shape: Annotated[Optional[list[str]], typer.Option("--shape", help="NAME:D1,D2 size of an input's dynamic dims (no batch dim); repeatable.")] = None,
    input_data: Annotated[str, typer.Option(help="zero, random or a JSON data file.")] = "random",
    measurement_interval: Annotated[float, typer.Option("-p", "--measurement-interval", help="Window length in ms.", min=1)] = 5000,
    stability_percentage: Annotated[float, typer.Option("-s", "--stability-percentage", help="Stable when the last 3 windows' throughputs are within this % of their mean.")] = 10.0,
    max_trials: Annotated[int, typer.Option("-r", "--max-trials", help="Most windows per level before it is reported unstable.", min=1)] = 10,
    percentile: Annotated[float, typer.Option(help="Latency percentile shown in the summary and the plot.")] = 95.0,
    csv_file: Annotated[Optional[Path], typer.Option("-f", "--latency-report-file", help="Write every number to this CSV file.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write every number (and each window) to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a latency-throughput PNG (needs matplotlib: inferstack\\[perf]).")] = None,
    workers: Annotated[int, typer.Option(help="Client processes; the load of each level is split between them.", min=1)] = 1,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request counts as failed.", min=0.001)] = 60.0,
    grpc_client: Annotated[GrpcServerKind, typer.Option(help="gRPC load client: inferstack (our own HTTP/2 client, ~1/6 of grpc.aio's CPU per call) or grpcio (grpc.aio).")] = GrpcServerKind.inferstack,
) -> None:
    """Measure throughput and latency of a model on any KServe v2 server (like Triton's perf_analyzer)."""
    from inferstack.perf.runner import PerfSettings, run

    settings = PerfSettings(
        model=model_name, version=model_version, url=url, protocol=protocol.value, binary=binary,
        batch_size=batch_size, concurrency_range=concurrency_range, request_rate_range=request_rate_range,
        distribution=distribution.value, shapes=list(shape or []), input_data=input_data,
        measurement_interval_ms=measurement_interval, stability_percentage=stability_percentage,
        max_trials=max_trials, percentile=percentile, csv=csv_file, json=json_file, plot=plot,
        workers=workers, timeout=request_timeout, grpc_client=grpc_client.value,
    )
    raise typer.Exit(run(settings))


@app.command(no_args_is_help=True)
def analyze(
    model_name: Annotated[str, typer.Option("-m", "--model-name", help="Model to analyze (a directory of the repository).")],
    repository: Annotated[
        Path,
        typer.Option("--repository", "--model-repository", help="Model repository holding the model (only read: a temporary copy is served).",
                     exists=True, file_okay=False, dir_okay=True, resolve_path=True),
    ],
    latency_budget_ms: Annotated[float, typer.Option(help="p99 latency budget: the best config has the highest throughput within it.", min=0.001)] = 20.0,
    max_instances: Annotated[int, typer.Option(help="Instance counts 1..N (threads split so instances x threads ~ cores).", min=1, max=64)] = 4,
    batch_sizes: Annotated[str, typer.Option(help="max_batch_size values to try (1: no batching).")] = "1,4,8,16",
    preferred_batch_sizes: Annotated[Optional[str], typer.Option(help="preferred_batch_size values to try below each max (default: the largest batch size below it).")] = None,
    delays_us: Annotated[str, typer.Option(help="max_queue_delay_microseconds values to try.")] = "0,100,1000",
    concurrency: Annotated[str, typer.Option(help="Concurrency levels to measure each config at.")] = "1,4,16",
    measurement_interval: Annotated[float, typer.Option("-p", "--measurement-interval", help="Window length in ms.", min=1)] = 1000,
    stability_percentage: Annotated[float, typer.Option(help="Stable when the last 3 windows' throughputs are within this % of their mean.")] = 10.0,
    max_trials: Annotated[int, typer.Option(help="Most windows per level.", min=1)] = 5,
    protocol: Annotated[PerfProtocol, typer.Option("-i", "--protocol", help="http or grpc.")] = PerfProtocol.http,
    shape: Annotated[Optional[list[str]], typer.Option("--shape", help="NAME:D1,D2 size of an input's dynamic dims (no batch dim); repeatable.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A small grid: 1 and 2 instances, the largest batch size, the smallest and largest delay.")] = False,
    output_config: Annotated[Optional[Path], typer.Option(help="Where to write the best config.pbtxt (default: ./<model>.analyzed.config.pbtxt).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (refused otherwise).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a throughput vs p99 PNG (needs matplotlib: inferstack\\[perf]).")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write every measurement to this JSON file.")] = None,
    server_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to start, and for each model load.", min=1)] = 300.0,
) -> None:
    """Find the best configuration of a model: sweep instances, batching and queue delay on a server of its own (like Triton's Model Analyzer)."""
    from inferstack.analyze.runner import AnalyzeSettings, run

    settings = AnalyzeSettings(
        model=model_name, repository=repository, latency_budget_ms=latency_budget_ms, max_instances=max_instances,
        batch_sizes=batch_sizes, preferred_batch_sizes=preferred_batch_sizes, delays_us=delays_us,
        concurrency=concurrency, measurement_interval_ms=measurement_interval,
        stability_percentage=stability_percentage, max_trials=max_trials, protocol=protocol.value,
        shapes=list(shape or []), output_config=output_config, overwrite=overwrite, plot=plot, json=json_file,
        quick=quick, server_timeout=server_timeout,
    )
    raise typer.Exit(run(settings))


@app.command()
def gateway(
    config: Annotated[Optional[Path], typer.Option("--config", help="Gateway YAML file (docs/gateway.md); runtime changes go to its state file.", exists=True, dir_okay=False)] = None,
    replica: Annotated[Optional[list[str]], typer.Option("--replica", help="Replica http://HOST:PORT[,grpc=HOST:PORT][,metrics=URL]; repeatable (added to the config's).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 0.0.0.0).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="HTTP port (default 9000).", min=0, max=65535)] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port (default 9001).", min=0, max=65535)] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus /metrics port (default 9002).", min=0, max=65535)] = None,
    state_file: Annotated[Optional[Path], typer.Option(help="Where admin API changes are persisted (default: CONFIG.state.json).")] = None,
    health_interval: Annotated[Optional[float], typer.Option(help="Seconds between replica health/index polls (default 1).", min=0.05)] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (with its request id).")] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option(help="text or json.")] = LogFormat.text,
) -> None:
    """Route KServe v2 traffic (HTTP and gRPC) over replicas: model- and load-aware, canary/A-B/shadow, auth, rate limits."""
    from inferstack.gateway.cli import run

    raise typer.Exit(run(config=config, replicas=list(replica or []), host=host, http_port=http_port,
                         grpc_port=grpc_port, metrics_port=metrics_port, state_file=state_file,
                         health_interval=health_interval, access_log=access_log,
                         log_level=log_level.value, log_format=log_format.value))


@app.command(no_args_is_help=True)
def worker(
    redis_url: Annotated[str, typer.Option(envvar="INFERSTACK_JOBS_REDIS_URL", callback=_check_redis_url, help="Redis URL of the job queue.")],
    model_repository: Annotated[
        Optional[Path],
        typer.Option("--model-repository", help="Run jobs in this process, on the models of this repository.",
                     exists=True, file_okay=False, dir_okay=True, resolve_path=True),
    ] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="Forward jobs to this KServe v2 server (http://host:port) instead.")] = None,
    concurrency: Annotated[int, typer.Option(help="Jobs run at once.", min=1)] = 1,
    jobs_queue: Annotated[str, typer.Option(help="Key prefix of the Redis queue (as given to serve).")] = "inferstack:jobs",
    webhook_secret: Annotated[
        Optional[str], typer.Option(envvar="INFERSTACK_WEBHOOK_SECRET", help="HMAC-SHA256 key signing callback_url webhooks.")
    ] = None,
    job_result_ttl: Annotated[float, typer.Option(help="Seconds a finished job's result is kept.", min=1)] = 3600.0,
    job_max_attempts: Annotated[int, typer.Option(help="Executions before a job is failed and dead-lettered.", min=1)] = 3,
    job_visibility_timeout: Annotated[float, typer.Option(help="Seconds without a heartbeat before a claimed job is taken over.", min=0.1)] = 60.0,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus /metrics on this port.", min=0, max=65535)] = None,
    host: Annotated[str, typer.Option(help="Address of the metrics server.")] = "0.0.0.0",
    drain_timeout: Annotated[float, typer.Option(help="On SIGTERM, seconds to finish running jobs (the rest run again elsewhere).", min=0)] = 30.0,
    name: Annotated[Optional[str], typer.Option(help="Consumer name in the Redis group (default host-pid).")] = None,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option(help="text for people, json (one object per line) for machines.")] = LogFormat.text,
) -> None:
    """Run async inference jobs from the Redis queue: in-process models (--model-repository) or a server (--server)."""
    if (model_repository is None) == (server is None):
        raise typer.BadParameter("give exactly one of --model-repository and --server")
    from inferstack.jobs.queue import QueueSettings
    from inferstack.jobs.worker import WorkerSettings, run_worker
    from inferstack.observability.logs import setup_logging

    setup_logging(log_level.value, log_format.value)
    settings = WorkerSettings(
        redis_url=redis_url, model_repository=model_repository, server_url=server, concurrency=concurrency,
        queue_prefix=jobs_queue, webhook_secret=webhook_secret, metrics_port=metrics_port, host=host,
        drain_timeout=drain_timeout, name=name,
        queue=QueueSettings(result_ttl=job_result_ttl, max_attempts=job_max_attempts,
                            visibility_timeout=job_visibility_timeout),
    )
    raise typer.Exit(run_worker(settings))
