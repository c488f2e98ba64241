"""Outputs of ``inferstack perf``: the table, CSV, JSON and the latency-throughput plot.

Latencies are in microseconds in CSV and JSON (as perf_analyzer writes them)
and in milliseconds in the table and the plot.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from inferstack.perf.engine import LevelResult

PLOT_MISSING = ("--plot needs matplotlib, which is not installed; install it with "
                "pip install 'inferstack[perf]' (or pip install matplotlib)")


def _ms(us: float | None, digits: int = 2) -> str:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "-"
    return f"{us / 1e3:,.{digits}f}"


def _us(us: float | None) -> str:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "-"
    return f"{us:,.0f}"


def _pct_keys(pct: float) -> list[str]:
    keys = ["p50", "p90", "p95", "p99"]
    extra = f"p{pct:g}"
    if extra not in keys:
        keys.append(extra)
    return keys


def level_line(r: LevelResult) -> str:
    """One line per finished level (the progress log)."""
    pk = f"p{r.percentile:g}"
    text = (f"{r.label}: {r.throughput:,.1f} infer/s, avg {_ms(r.latency('avg'))} ms, "
            f"{pk} {_ms(r.latency(pk))} ms, {r.errors} errors")
    if r.mode == "rate":
        text += f", achieved {r.send_rate:,.1f} req/s, {r.late} late"
    if r.server:
        text += (f", server queue {_us(r.server.get('queue_us'))} us, "
                 f"compute {_us(_compute_us(r.server))} us")
    return text + f" [{r.status}]"


def _compute_us(server: dict[str, Any]) -> float | None:
    parts = [server.get(k) for k in ("compute_input_us", "compute_infer_us", "compute_output_us")]
    return sum(parts) if all(p is not None for p in parts) else None


def table(results: Sequence[LevelResult], title: str | None = None) -> Any:
    """A rich Table of every level."""
    from rich.table import Table

    if not results:
        return Table(title=title)
    pct = results[0].percentile
    rate_mode = results[0].mode == "rate"
    has_server = any(r.server for r in results)
    t = Table(title=title, title_justify="left")
    t.add_column("Request rate" if rate_mode else "Concurrency", justify="right")
    t.add_column("infer/s", justify="right")
    if rate_mode:
        t.add_column("achieved req/s", justify="right")
        t.add_column("late", justify="right")
    t.add_column("avg ms", justify="right")
    for key in _pct_keys(pct):
        t.add_column(f"{key} ms", justify="right")
    t.add_column("errors", justify="right")
    if has_server:
        for name in ("queue", "comp in", "infer", "comp out"):
            t.add_column(f"srv {name} us", justify="right")
        t.add_column("srv batch", justify="right")
    t.add_column("status")
    for r in results:
        row = [f"{r.value:g}" if rate_mode else str(int(r.value)), f"{r.throughput:,.1f}"]
        if rate_mode:
            row += [f"{r.send_rate:,.1f}", str(r.late)]
        row.append(_ms(r.latency("avg")))
        row += [_ms(r.latency(k)) for k in _pct_keys(pct)]
        row.append(f"[red]{r.errors}[/red]" if r.errors else "0")
        if has_server:
            s = r.server or {}
            row += [_us(s.get("queue_us")), _us(s.get("compute_input_us")), _us(s.get("compute_infer_us")),
                    _us(s.get("compute_output_us"))]
            batch = s.get("avg_batch_size")
            row.append(f"{batch:.2f}" if batch is not None else "-")
        status = r.status
        row.append({"stable": "stable", "unstable": "[yellow]unstable[/yellow]"}.get(status, f"[red]{status}[/red]"))
        t.add_row(*row)
    return t


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def csv_rows(results: Sequence[LevelResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: perf_analyzer's column names where they mean the same (latencies in us)."""
    pct = results[0].percentile if results else 95.0
    rate_mode = bool(results) and results[0].mode == "rate"
    header = ["Request Rate" if rate_mode else "Concurrency", "Inferences/Second", "Requests/Second",
              "Achieved Request Rate", "Late Requests", "Avg Send Delay", "Requests", "Errors",
              "Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output",
              "Server Request", "Server Avg Batch Size", "Server Requests",
              "Avg latency", "Min latency", "Max latency"]
    keys = _pct_keys(pct)
    header += [f"{k} latency" for k in keys]
    header += ["Status", "Measured Windows", "Measured Seconds", "Total Sent", "Total Completed", "Total Errors",
               "Server Success Total", "Server Fail Total", "Batch Size", "First Error"]
    rows = []
    for r in results:
        s = r.server or {}
        st = r.server_total or {}
        row: list[Any] = [
            r.value if rate_mode else int(r.value), _num(r.throughput), _num(r.request_throughput),
            _num(r.send_rate), r.late, _num(r.avg_send_delay_us), r.completed, r.errors,
            _num(s.get("queue_us")), _num(s.get("compute_input_us")), _num(s.get("compute_infer_us")),
            _num(s.get("compute_output_us")), _num(s.get("request_us")), _num(s.get("avg_batch_size")),
            s.get("success_count", ""),
            _num(r.latency("avg")), _num(r.latency("min")), _num(r.latency("max")),
        ]
        row += [_num(r.latency(k)) for k in keys]
        row += [r.status, r.measured_windows, _num(r.duration_s), r.total_sent, r.total_completed, r.total_errors,
                st.get("success_count", ""), st.get("fail_count", ""), r.batch_size, r.first_error or ""]
        rows.append(row)
    return header, rows


def _num(value: float | None) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(value, 3) if isinstance(value, float) else value


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    header, rows = csv_rows(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(path: Path, results: Sequence[LevelResult], title: str) -> None:
    """Latency (avg, p50 and the chosen percentile) against throughput, one point per level."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = [r for r in results if r.completed > 0]
    pct = results[0].percentile if results else 95.0
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        x = [r.throughput for r in points]
        for key, label, style in (("p50", "p50", "o-"), (f"p{pct:g}", f"p{pct:g}", "s-"), ("avg", "avg", "^--")):
            ax.plot(x, [(r.latency(key) or float("nan")) / 1e3 for r in points], style, label=label)
        for r in points:
            value = r.latency(f"p{pct:g}")
            if value is not None:
                text = f"{int(r.value)}" if r.mode == "concurrency" else f"{r.value:g}/s"
                ax.annotate(text, (r.throughput, value / 1e3), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel("throughput (infer/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend(title="points: concurrency" if points and points[0].mode == "concurrency"
                  else "points: request rate")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
