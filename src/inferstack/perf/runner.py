"""``inferstack perf``: read the model, build the requests, run every level, report.

:func:`run` is what the CLI calls; it never raises for a problem with the
target or the options (it prints the message and returns 1), and load errors
are counted in the results instead of stopping the run.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from inferstack import __version__
from inferstack.perf import inputs as inputs_mod
from inferstack.perf import report
from inferstack.perf.clients import DEFAULT_TIMEOUT, GrpcClient, HttpClient, PerfSetupError, parse_url
from inferstack.perf.engine import (
    Controller,
    EngineSettings,
    GeneratorConfig,
    LevelResult,
    LevelSpec,
    LoadGenerator,
    ProcessPool,
    Window,
    parse_range,
    percentile,
)


@dataclass
class PerfSettings:
    model: str
    version: str = ""
    url: str | None = None
    protocol: str = "http"
    binary: bool = True
    batch_size: int = 1
    concurrency_range: str | None = None
    request_rate_range: str | None = None
    distribution: str = "constant"
    shapes: list[str] = field(default_factory=list)
    input_data: str = "random"
    measurement_interval_ms: float = 5000.0
    stability_percentage: float = 10.0
    max_trials: int = 10
    percentile: float = 95.0
    csv: Path | None = None
    json: Path | None = None
    plot: Path | None = None
    workers: int = 1
    timeout: float = DEFAULT_TIMEOUT
    seed: int = 0
    grpc_client: str = "inferstack"


def levels_of(settings: PerfSettings) -> list[LevelSpec]:
    if settings.concurrency_range and settings.request_rate_range:
        raise PerfSetupError("give either --concurrency-range or --request-rate-range, not both")
    if settings.request_rate_range:
        return [LevelSpec("rate", v) for v in
                parse_range(settings.request_rate_range, integer=False, option="--request-rate-range")]
    return [LevelSpec("concurrency", v) for v in
            parse_range(settings.concurrency_range or "1", integer=True, option="--concurrency-range")]


def _check(settings: PerfSettings) -> None:
    if settings.protocol not in ("http", "grpc"):
        raise PerfSetupError(f"-i {settings.protocol!r}: choose http or grpc")
    if settings.distribution not in ("constant", "poisson"):
        raise PerfSetupError(f"--distribution {settings.distribution!r}: choose constant or poisson")
    if settings.measurement_interval_ms <= 0:
        raise PerfSetupError("--measurement-interval must be greater than 0 ms")
    if settings.max_trials < 1:
        raise PerfSetupError("--max-trials must be at least 1")
    if settings.stability_percentage <= 0:
        raise PerfSetupError("--stability-percentage must be greater than 0")
    if not 0 < settings.percentile <= 100:
        raise PerfSetupError("--percentile must be in (0, 100]")
    if settings.workers < 1:
        raise PerfSetupError("--workers must be at least 1")
    if settings.plot is not None and not report.plot_available():
        raise PerfSetupError(report.PLOT_MISSING)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Wide output when piped to a file or log (rich would wrap at 80 columns).
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=200)


class Progress:
    """The live display: a bar over the levels and the current window's numbers."""

    def __init__(self, console: Any, levels: int, settings: PerfSettings, batch_size: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.console = console
        self.settings = settings
        self.batch_size = batch_size
        self.bar = RichProgress(SpinnerColumn(), TextColumn("[bold]levels"), BarColumn(bar_width=24),
                                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                                console=console, transient=True, refresh_per_second=4)
        self.task = self.bar.add_task("starting", total=levels)

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def window(self, spec: LevelSpec, windows: list[Window], status: str) -> None:
        w = windows[-1]
        s = self.settings
        parts = [spec.label, f"window {len(windows)}/{s.max_trials}", f"{w.throughput(self.batch_size):,.1f} infer/s"]
        if len(w.latencies_ns):
            lat = np.sort(w.latencies_ns)
            parts.append(f"p{s.percentile:g} {percentile(lat, s.percentile) / 1e6:.2f} ms")
        if w.errors:
            parts.append(f"{w.errors} errors")
        th = [x.throughput(self.batch_size) for x in windows[-3:]]
        mean = sum(th) / len(th)
        if len(th) == 3 and mean > 0:
            parts.append(f"spread ±{max(abs(v - mean) for v in th) / mean * 100:.1f}%")
        if status == "measuring":
            parts.append(f"waiting for ±{s.stability_percentage:g}%")
        self.bar.update(self.task, description=escape(" · ".join(parts)))

    def level_done(self, result: LevelResult) -> None:
        self.bar.advance(self.task)
        color = {"stable": "green", "unstable": "yellow"}.get(result.status, "red")
        self.console.print(f"[{color}]•[/{color}] {escape(report.level_line(result))}", highlight=False)
        if result.first_error and (result.errors or result.total_errors):
            self.console.print(f"  [red]first error:[/red] {escape(result.first_error)}", highlight=False)


async def _prepare(settings: PerfSettings, client: Any) -> tuple[inputs_mod.ModelInfo, list[bytes], int]:
    metadata = await client.metadata()
    config = await client.config()
    model = inputs_mod.model_info(metadata, config)
    shapes = inputs_mod.parse_shape_options(settings.shapes)
    tensors = inputs_mod.build_inputs(model, shapes, settings.batch_size, settings.input_data, settings.seed)
    requests = inputs_mod.encode_requests(client, model, tensors, settings.protocol, settings.binary)
    return model, requests, len(requests[0])


async def _run(settings: PerfSettings, out: Any, err: Any) -> tuple[int, dict[str, Any] | None]:
    _check(settings)
    levels = levels_of(settings)
    host, port = parse_url(settings.url or "localhost", settings.protocol)
    if settings.protocol == "grpc":
        client: Any = GrpcClient(host, port, settings.model, settings.version, settings.timeout)
    else:
        client = HttpClient(host, port, settings.model, settings.version, settings.timeout)
    generator: Any = None
    results: list[LevelResult] = []
    try:
        model, requests, request_bytes = await _prepare(settings, client)
        stats_available = await client.statistics() is not None
        mode = ("binary" if settings.binary else "JSON") if settings.protocol == "http" else "raw contents"
        err.print(f"[bold]inferstack perf[/bold] {model.name or settings.model}"
                  f"{(' version ' + settings.version) if settings.version else ''} at {client.target} over "
                  f"{settings.protocol.upper()} ({mode}), batch {settings.batch_size}, "
                  f"{len(requests)} distinct request{'s' if len(requests) > 1 else ''} of {request_bytes:,} bytes, "
                  f"{settings.measurement_interval_ms:g} ms windows, stable at ±{settings.stability_percentage:g}% "
                  f"over 3 windows (at most {settings.max_trials}), "
                  f"{settings.workers} worker process{'es' if settings.workers > 1 else ''}"
                  + ("" if stats_available else "; the server has no statistics extension: no server-side split"),
                  highlight=False)
        config = GeneratorConfig(
            protocol=settings.protocol, host=host, port=port, model=settings.model, version=settings.version,
            requests=requests, interval=settings.measurement_interval_ms / 1e3, max_trials=settings.max_trials,
            distribution=settings.distribution, timeout=settings.timeout, seed=settings.seed,
            grpc_client=settings.grpc_client,
        )
        if settings.workers > 1:
            generator = ProcessPool(config, settings.workers)
            await generator.open()
        else:
            generator = LoadGenerator(config)
        engine = EngineSettings(batch_size=settings.batch_size, interval=config.interval,
                                stability_percentage=settings.stability_percentage,
                                max_trials=settings.max_trials, percentile=settings.percentile,
                                lead=0.2 if settings.workers > 1 else 0.05)
        with Progress(err, len(levels), settings, settings.batch_size) as progress:
            controller = Controller(generator, engine, client.statistics if stats_available else None,
                                    on_window=progress.window)
            for spec in levels:
                result = await controller.run_level(spec)
                results.append(result)
                progress.level_done(result)
    finally:
        if generator is not None:
            await generator.close()
        await client.close()

    title = (f"{model.name or settings.model} · {settings.protocol.upper()}"
             f"{' ' + ('binary' if settings.binary else 'JSON') if settings.protocol == 'http' else ''}"
             f" · batch {settings.batch_size} · {client.target}")
    out.print(report.table(results, title=title))
    document = {
        "tool": "inferstack perf",
        "inferstack_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "target": {"url": client.target, "protocol": settings.protocol},
        "model": {"name": model.name, "versions": model.versions, "platform": model.platform,
                  "max_batch_size": model.max_batch_size,
                  "inputs": [asdict(t) for t in model.inputs], "outputs": [asdict(t) for t in model.outputs]},
        "request_bytes": request_bytes,
        "distinct_requests": len(requests),
        "server_statistics": stats_available,
        "levels": [r.as_dict() for r in results],
    }
    if settings.csv is not None:
        report.write_csv(settings.csv, results)
        err.print(f"wrote {settings.csv}", highlight=False)
    if settings.json is not None:
        report.write_json(settings.json, document)
        err.print(f"wrote {settings.json}", highlight=False)
    if settings.plot is not None:
        report.write_plot(settings.plot, results, title)
        err.print(f"wrote {settings.plot}", highlight=False)
    failed = [r for r in results if r.completed == 0]
    return (1 if failed else 0), document


def run(settings: PerfSettings) -> int:
    """Run ``inferstack perf``; returns the exit code (0: every level had successful requests)."""
    out, err = _console(), _console(stderr=True)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    try:
        code, _ = runner(_run(settings, out, err))
        return code
    except PerfSetupError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        return 130


__all__ = ["PerfSettings", "levels_of", "run"]
