"""``inferstack analyze``: sweep a model's configuration on a server of our own, pick the best one.

:func:`run` is what the CLI calls. It

1. checks the options and that no output file would be overwritten (before
   anything is started);
2. copies the model into a temporary repository and starts
   ``python -m inferstack serve`` there (explicit model control);
3. loads the model's own config and measures it (the ``original`` row), then
   for every candidate of the grid writes its ``config.pbtxt``, reloads the
   model through ``POST /v2/repository/models/{m}/load`` and measures it with
   the perf engine at every concurrency level;
4. always stops the server and removes the temporary repository;
5. prints the table and the best configuration under the latency budget and
   writes it (and the JSON and plot when asked).

Exit codes: 0 when a configuration met the budget and was written; 1 when
none did (nothing is written but the JSON and plot), or the sweep could not
run; 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from rich.markup import escape

from inferstack import __version__
from inferstack.analyze import configs as configs_mod
from inferstack.analyze import results as results_mod
from inferstack.analyze.grid import (
    Candidate,
    GridError,
    build_grid,
    estimate_seconds,
    format_duration,
    parse_int_list,
    usable_cores,
)
from inferstack.analyze.server import READY_TIMEOUT, AnalyzeError, ManagedServer, TemporaryRepository
from inferstack.perf import inputs as inputs_mod
from inferstack.perf import report as perf_report
from inferstack.perf.clients import DEFAULT_TIMEOUT, GrpcClient, HttpClient, PerfSetupError
from inferstack.perf.engine import Controller, EngineSettings, GeneratorConfig, LevelResult, LevelSpec, LoadGenerator
from inferstack.repository.config import ModelConfigError

PLOT_MISSING = ("--plot needs matplotlib, which is not installed; install it with "
                "pip install 'inferstack[perf]' (or pip install matplotlib)")


@dataclass
class AnalyzeSettings:
    model: str
    repository: Path
    latency_budget_ms: float = 20.0
    max_instances: int = 4
    batch_sizes: str = "1,4,8,16"
    preferred_batch_sizes: str | None = None
    delays_us: str = "0,100,1000"
    concurrency: str = "1,4,16"
    measurement_interval_ms: float = 1000.0
    stability_percentage: float = 10.0
    max_trials: int = 5
    protocol: str = "http"
    shapes: list[str] = field(default_factory=list)
    output_config: Path | None = None
    overwrite: bool = False
    plot: Path | None = None
    json: Path | None = None
    quick: bool = False
    server_timeout: float = READY_TIMEOUT
    request_timeout: float = DEFAULT_TIMEOUT

    def output_path(self) -> Path:
        return self.output_config if self.output_config is not None else Path(f"{self.model}.analyzed.config.pbtxt")


@dataclass
class Plan:
    """The checked options: lists parsed, paths resolved."""

    model_dir: Path
    batch_sizes: list[int]
    preferred: list[int] | None
    delays_us: list[int]
    concurrency: list[int]
    shapes: dict[str, list[int]]
    output: Path
    cores: int


def check(settings: AnalyzeSettings) -> Plan:
    """Everything that can be refused before a server starts (AnalyzeError with the reason)."""
    s = settings
    try:
        batch_sizes = parse_int_list(s.batch_sizes, "--batch-sizes", minimum=1)
        preferred = (parse_int_list(s.preferred_batch_sizes, "--preferred-batch-sizes", minimum=1)
                     if s.preferred_batch_sizes else None)
        delays = parse_int_list(s.delays_us, "--delays-us", minimum=0)
        concurrency = parse_int_list(s.concurrency, "--concurrency", minimum=1)
        shapes = inputs_mod.parse_shape_options(s.shapes)
    except (GridError, PerfSetupError) as exc:
        raise AnalyzeError(str(exc)) from None
    if s.protocol not in ("http", "grpc"):
        raise AnalyzeError(f"--protocol {s.protocol!r}: choose http or grpc")
    if s.max_instances < 1:
        raise AnalyzeError("--max-instances must be at least 1")
    if s.latency_budget_ms <= 0:
        raise AnalyzeError("--latency-budget-ms must be greater than 0")
    if s.measurement_interval_ms <= 0 or s.max_trials < 1 or s.stability_percentage <= 0:
        raise AnalyzeError("--measurement-interval, --max-trials and --stability-percentage must be positive")
    repository = Path(s.repository)
    if not repository.is_dir():
        raise AnalyzeError(f"--repository {repository}: not a directory")
    model_dir = repository / s.model
    if "/" in s.model or s.model in ("", ".", "..") or not model_dir.is_dir():
        raise AnalyzeError(f"model {s.model!r} is not a directory of the repository {repository}")
    if not any(p.is_dir() and p.name.isdigit() and not p.name.startswith("0") for p in model_dir.iterdir()):
        raise AnalyzeError(f"model {s.model!r} in {repository} has no version directory (1/, 2/, ...)")
    output = s.output_path()
    try:
        configs_mod.check_writable(output, s.overwrite, "--output-config")
        if s.json is not None:
            configs_mod.check_writable(s.json, s.overwrite, "--json")
        if s.plot is not None:
            configs_mod.check_writable(s.plot, s.overwrite, "--plot")
    except configs_mod.OutputExistsError as exc:
        raise AnalyzeError(str(exc)) from None
    if s.plot is not None and not perf_report.plot_available():
        raise AnalyzeError(PLOT_MISSING)
    return Plan(model_dir=model_dir, batch_sizes=batch_sizes, preferred=preferred, delays_us=delays,
                concurrency=concurrency, shapes=shapes, output=output, cores=usable_cores())


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class SweepProgress:
    """One bar over every (configuration, concurrency) level of the sweep, with the current window's numbers."""

    def __init__(self, console: Any, total_levels: int, configs: int, settings: AnalyzeSettings) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.settings = settings
        self.configs = configs
        self.bar = Progress(SpinnerColumn(), TextColumn("[bold]sweep"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=console, transient=True,
                            refresh_per_second=4)
        self.task = self.bar.add_task("starting", total=total_levels)
        self.current = ""

    def __enter__(self) -> SweepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def config(self, index: int, result: results_mod.ConfigResult, what: str) -> None:
        self.current = f"{index + 1}/{self.configs} {result.id} ({result.candidate.describe()})"
        self.bar.update(self.task, description=escape(f"{self.current} · {what}"))

    def window(self, spec: LevelSpec, windows: list, status: str) -> None:
        w = windows[-1]
        text = (f"{self.current} · {spec.label} · window {len(windows)}/{self.settings.max_trials} · "
                f"{w.throughput(1):,.0f} infer/s")
        self.bar.update(self.task, description=escape(text))

    def advance(self, levels: int = 1) -> None:
        self.bar.advance(self.task, levels)

    def config_done(self, result: results_mod.ConfigResult) -> None:
        budget_us = self.settings.latency_budget_ms * 1e3
        if result.load_error is not None:
            self.console.print(f"[red]✗[/red] {escape(result.id)} {escape(result.candidate.describe())}: "
                               f"load failed: {escape(result.load_error)}", highlight=False)
            return
        parts = []
        for level in result.levels:
            p99 = level.latency("p99")
            if results_mod.usable(level):
                color = "green" if p99 <= budget_us else "yellow"
                parts.append(f"c{int(level.value)} {level.throughput:,.0f}/s p99 [{color}]{p99 / 1e3:,.2f}[/{color}] ms")
            else:
                parts.append(f"c{int(level.value)} [red]{escape(level.status)}"
                             f"{', ' + str(level.errors) + ' errors' if level.errors else ''}[/red]")
        self.console.print(f"[green]•[/green] {escape(result.id)} {escape(result.candidate.describe())}: "
                           + " · ".join(parts), highlight=False)


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def _windows_text(max_trials: int) -> str:
    fewest = min(3, max_trials)
    return f"{fewest} windows" if fewest == max_trials else f"{fewest} to {max_trials} windows"


class _LoadFailed(Exception):
    pass


def original_candidate(effective: dict[str, Any]) -> Candidate:
    """The model's own configuration, described from the server's effective (auto-completed) config."""
    groups = effective.get("instance_group") or []
    instances = sum(max(1, int(g.get("count") or 0)) for g in groups) or 1
    threads = None
    parameters = effective.get("parameters") or {}
    value = (parameters.get(configs_mod.THREADS_PARAMETER) or {}).get("string_value")
    if value and str(value).isdigit() and int(value) > 0:
        threads = int(value)
    max_batch_size = int(effective.get("max_batch_size") or 0)
    batching = effective.get("dynamic_batching")
    preferred: tuple[int, ...] = ()
    delay = None
    if batching is not None and max_batch_size > 0:
        preferred = tuple(int(p) for p in batching.get("preferred_batch_size") or ())
        delay = int(batching.get("max_queue_delay_microseconds") or 0)
    return Candidate(instances, threads, max_batch_size, preferred, delay, original=True)


class Analysis:
    """State of one run: what has been measured so far survives an interruption."""

    def __init__(self, settings: AnalyzeSettings, plan: Plan, err: Any) -> None:
        self.settings = settings
        self.plan = plan
        self.err = err
        self.results: list[results_mod.ConfigResult] = []
        self.candidates: list[Candidate] = []
        self.original_config: Any = None
        self.original_text: str | None = None
        self.batching: bool | None = None
        self.started = time.monotonic()
        self.server_pid: int | None = None

    # -- control calls --------------------------------------------------------------------

    async def _load(self, control: httpx.AsyncClient, server: ManagedServer) -> float:
        begin = time.monotonic()
        path = f"/v2/repository/models/{quote(self.settings.model, safe='')}/load"
        try:
            response = await control.post(path, timeout=self.settings.server_timeout)
        except httpx.HTTPError as exc:
            if not server.alive():
                raise AnalyzeError("the server exited during a model load") from None
            raise _LoadFailed(f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                reason = response.json().get("error") or response.text
            except ValueError:
                reason = response.text
            raise _LoadFailed(str(reason).strip())
        return time.monotonic() - begin

    async def _effective_config(self, control: httpx.AsyncClient) -> dict[str, Any]:
        response = await control.get(f"/v2/models/{quote(self.settings.model, safe='')}/config")
        if response.status_code != 200:
            raise AnalyzeError(f"cannot read the model's configuration from the server: HTTP {response.status_code}")
        return response.json()

    # -- measuring ----------------------------------------------------------------------

    def _client(self, server: ManagedServer) -> Any:
        s = self.settings
        if s.protocol == "grpc":
            return GrpcClient("127.0.0.1", server.grpc_port, s.model, "", s.request_timeout)
        return HttpClient("127.0.0.1", server.http_port, s.model, "", s.request_timeout)

    async def _measure(self, server: ManagedServer, progress: SweepProgress) -> list[LevelResult]:
        s = self.settings
        client = self._client(server)
        generator = None
        levels: list[LevelResult] = []
        try:
            model = inputs_mod.model_info(await client.metadata(), await client.config())
            tensors = inputs_mod.build_inputs(model, self.plan.shapes, 1, "random", 0)
            requests = inputs_mod.encode_requests(client, model, tensors, s.protocol, binary=True)
            stats = client.statistics if await client.statistics() is not None else None
            port = server.grpc_port if s.protocol == "grpc" else server.http_port
            generator = LoadGenerator(GeneratorConfig(
                protocol=s.protocol, host="127.0.0.1", port=port, model=s.model, version="", requests=requests,
                interval=s.measurement_interval_ms / 1e3, max_trials=s.max_trials, timeout=s.request_timeout))
            engine = EngineSettings(batch_size=1, interval=s.measurement_interval_ms / 1e3,
                                    stability_percentage=s.stability_percentage, max_trials=s.max_trials,
                                    percentile=99.0, lead=0.05)
            controller = Controller(generator, engine, stats, on_window=progress.window)
            for concurrency in self.plan.concurrency:
                levels.append(await controller.run_level(LevelSpec("concurrency", concurrency)))
                progress.advance()
                if not server.alive():
                    raise AnalyzeError("the server exited during a measurement")
        finally:
            if generator is not None:
                await generator.close()
            await client.close()
        return levels

    # -- the run ------------------------------------------------------------------------

    def _grid(self) -> list[Candidate]:
        p = self.plan
        return build_grid(max_instances=self.settings.max_instances, batch_sizes=p.batch_sizes,
                          delays_us=p.delays_us, batching=bool(self.batching), cores=p.cores,
                          preferred=p.preferred, quick=self.settings.quick)

    async def sweep(self, server: ManagedServer, repo: TemporaryRepository) -> None:
        s, p, err = self.settings, self.plan, self.err
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as control:
            # The model's own configuration first: it must load, and it says whether the model batches.
            with err.status(f"loading {s.model} with its own configuration ..."):
                try:
                    load_seconds = await self._load(control, server)
                except _LoadFailed as exc:
                    raise AnalyzeError(f"model {s.model!r} does not load with its own configuration: {exc}") from None
                effective = await self._effective_config(control)
            original = original_candidate(effective)
            self.batching = int(effective.get("max_batch_size") or 0) > 0
            grid = [c for c in self._grid()
                    if not configs_mod.same_config(configs_mod.render(self.original_config, c), self.original_config)]
            self.candidates = [original, *grid]
            levels = len(p.concurrency)
            low, high = estimate_seconds(len(self.candidates), levels, s.measurement_interval_ms / 1e3,
                                         s.max_trials, reload_s=max(0.5, load_seconds + 0.3))
            err.print(
                f"[bold]inferstack analyze[/bold] {escape(s.model)}: {len(self.candidates)} configurations "
                f"(the original + {len(grid)}) x {levels} concurrency level{'s' if levels != 1 else ''} "
                f"({', '.join(map(str, p.concurrency))}) over {s.protocol.upper()}, "
                f"{s.measurement_interval_ms:g} ms windows, {_windows_text(s.max_trials)} per level; "
                f"expected [bold]{format_duration(low)}[/bold]"
                + (f" (up to {format_duration(high)} if levels need every window to settle)" if high > low else ""),
                highlight=False)
            if not self.batching:
                err.print("the model does not batch (max_batch_size 0): sweeping instance counts only", highlight=False)
            err.print(f"p99 budget {s.latency_budget_ms:g} ms; {p.cores} cores, so instances x threads ~ {p.cores}; "
                      f"server log: {repo.log_path}", highlight=False)
            with SweepProgress(err, len(self.candidates) * levels, len(self.candidates), s) as progress:
                for index, candidate in enumerate(self.candidates):
                    cid = "original" if candidate.original else f"c{index:02d}"
                    rendered = configs_mod.render(self.original_config, candidate)
                    result = results_mod.ConfigResult(cid, candidate, configs_mod.config_text(rendered))
                    self.results.append(result)
                    if candidate.original:
                        result.config_text = self.original_text or result.config_text
                        result.load_seconds = load_seconds
                    else:
                        progress.config(index, result, "loading")
                        repo.write_config(result.config_text)
                        try:
                            result.load_seconds = await self._load(control, server)
                        except _LoadFailed as exc:
                            result.load_error = str(exc)
                            progress.advance(levels)
                            progress.config_done(result)
                            continue
                    progress.config(index, result, "measuring")
                    try:
                        result.levels = await self._measure(server, progress)
                    except PerfSetupError as exc:
                        raise AnalyzeError(str(exc)) from None
                    progress.config_done(result)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _header(settings: AnalyzeSettings, plan: Plan, selection: results_mod.Selection) -> list[str]:
    best = selection.best
    assert best is not None
    lat = best.level.latency_us
    source = plan.model_dir / "config.pbtxt"
    return [
        f"Written by inferstack analyze {__version__} on {time.strftime('%Y-%m-%d %H:%M')}",
        f"from {source if source.exists() else plan.model_dir} (its comments are not carried over).",
        f"Best under p99 <= {settings.latency_budget_ms:g} ms: {best.result.candidate.describe()};",
        (f"{best.level.throughput:,.1f} infer/s at concurrency {int(best.level.value)} "
         f"(p50 {lat['p50'] / 1e3:.2f} ms, p99 {lat['p99'] / 1e3:.2f} ms) over {settings.protocol.upper()}, "
         "client batch 1,"),
        f"measured on a machine with {plan.cores} usable cores: intra_op_thread_count is sized for it.",
        "",
    ]


def document(settings: AnalyzeSettings, plan: Plan, analysis: Analysis, selection: results_mod.Selection,
             complete: bool, written: Path | None) -> dict[str, Any]:
    return {
        "tool": "inferstack analyze",
        "inferstack_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "python": sys.version.split()[0], "cores": plan.cores},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "model": {"name": settings.model, "directory": str(plan.model_dir), "batching": analysis.batching,
                  "original_config": analysis.original_text},
        "server": {"pid": analysis.server_pid},
        "complete": complete,
        "elapsed_s": round(time.monotonic() - analysis.started, 3),
        "selection": selection.as_dict(),
        "output_config": str(written) if written else None,
        "configs": [r.as_dict() for r in analysis.results],
    }


def _report(settings: AnalyzeSettings, plan: Plan, analysis: Analysis, out: Any, err: Any, complete: bool) -> int:
    s = settings
    selection = results_mod.select_best(analysis.results, s.latency_budget_ms)
    title = (f"{s.model} · {s.protocol.upper()} · client batch 1 · p99 budget {s.latency_budget_ms:g} ms"
             + ("" if complete else " · INCOMPLETE"))
    if analysis.results:
        out.print(results_mod.table(analysis.results, selection, title=title))
    written: Path | None = None
    code = 1
    best = selection.best
    if best is not None:
        lat = best.level.latency_us
        so_far = "" if complete else " so far"
        out.print(f"[bold green]Best{so_far} under p99 ≤ {s.latency_budget_ms:g} ms:[/bold green] {escape(best.result.id)} "
                  f"({escape(best.result.candidate.describe())}) at concurrency {int(best.level.value)}: "
                  f"[bold]{best.level.throughput:,.1f} infer/s[/bold], p50 {lat['p50'] / 1e3:.2f} ms, "
                  f"p99 {lat['p99'] / 1e3:.2f} ms", highlight=False)
        if best.level.status != "stable":
            out.print(f"[yellow]Its level did not settle within ±{s.stability_percentage:g}% in {s.max_trials} windows: "
                      "the numbers are noisy (a busy machine?); a longer --measurement-interval or more --max-trials "
                      "helps.[/yellow]", highlight=False)
        original = next((r for r in analysis.results if r.candidate.original), None)
        base = results_mod.best_throughput_within(original, s.latency_budget_ms) if original else None
        if best.result is original:
            out.print("The model's own configuration is the best one measured.", highlight=False)
        elif base is not None and base.throughput > 0:
            out.print(f"{best.level.throughput / base.throughput:.2f}x the original configuration's best under the "
                      f"budget ({base.throughput:,.1f} infer/s at concurrency {int(base.value)}).", highlight=False)
        elif original is not None:
            out.print("The original configuration had no point within the budget.", highlight=False)
        if complete:
            rendered = configs_mod.render(analysis.original_config, best.result.candidate)
            text = configs_mod.config_text(rendered, _header(s, plan, selection))
            try:
                configs_mod.write_text(plan.output, text, s.overwrite)
                written = plan.output
                err.print(f"wrote {plan.output}", highlight=False)
                code = 0
            except (configs_mod.OutputExistsError, OSError) as exc:
                err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        else:
            err.print("[yellow]the sweep did not finish: no configuration written[/yellow]", highlight=False)
    else:
        low = selection.lowest_latency
        if low is None:
            out.print("[red]No configuration completed a measurement without errors.[/red]", highlight=False)
        else:
            lat = low.level.latency_us
            out.print(f"[bold red]No configuration kept p99 within {s.latency_budget_ms:g} ms.[/bold red] "
                      f"The lowest p99 was {escape(low.result.id)} ({escape(low.result.candidate.describe())}) at "
                      f"concurrency {int(low.level.value)}: p99 {lat['p99'] / 1e3:.2f} ms, "
                      f"{low.level.throughput:,.1f} infer/s. Nothing written; raise --latency-budget-ms to accept it.",
                      highlight=False)
    if s.json is not None:
        perf_report.write_json(s.json, document(s, plan, analysis, selection, complete, written))
        err.print(f"wrote {s.json}", highlight=False)
    if s.plot is not None and analysis.results:
        results_mod.write_plot(s.plot, analysis.results, selection, title)
        err.print(f"wrote {s.plot}", highlight=False)
    return code


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=200)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(coro)
    return uvloop.run(coro)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that the finally blocks stop the server and remove the temporary repository


def run(settings: AnalyzeSettings) -> int:
    """Run ``inferstack analyze``; returns the exit code."""
    out, err = _console(), _console(stderr=True)
    try:
        plan = check(settings)
        original_config, original_text = configs_mod.read_original(plan.model_dir)
    except (AnalyzeError, ModelConfigError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    analysis = Analysis(settings, plan, err)
    analysis.original_config, analysis.original_text = original_config, original_text
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread: the caller handles signals
        previous = None
    repo: TemporaryRepository | None = None
    server: ManagedServer | None = None
    complete = False
    interrupted = False
    try:
        repo = TemporaryRepository(plan.model_dir, settings.model)
        repo.populate()
        if original_text is not None:
            repo.write_config(original_text)
        server = ManagedServer(repo.root, repo.log_path, grpc=settings.protocol == "grpc")
        with err.status("starting the server ..."):
            server.start(settings.server_timeout)
        analysis.server_pid = server.pid
        _run_async(analysis.sweep(server, repo))
        complete = True
    except AnalyzeError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        if repo is not None and (tail := repo.log_tail()):
            err.print("[dim]server log (last lines):[/dim]", highlight=False)
            err.print(tail, highlight=False, markup=False)
        if not analysis.results:
            return 1
    except KeyboardInterrupt:
        interrupted = True
        err.print("[yellow]interrupted[/yellow]")
    finally:
        if server is not None:
            server.stop()
        if repo is not None:
            repo.remove()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    code = _report(settings, plan, analysis, out, err, complete)
    return 130 if interrupted else code


__all__ = ["AnalyzeSettings", "Plan", "check", "original_candidate", "run"]
