"""What a sweep measured, the choice of the best configuration, the table and the plot.

A *point* is one configuration at one concurrency level. The best
configuration is the one with the point of highest throughput whose p99
latency is within the budget. Points that had errors, or whose level failed,
never count. If no point is within the budget, there is no best one, and the
lowest-latency point is reported instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferstack.analyze.grid import Candidate
from inferstack.perf.engine import LevelResult


@dataclass
class ConfigResult:
    """One candidate: its id (``original``, ``c01``, ...), config text, and its levels (or why it failed)."""

    id: str
    candidate: Candidate
    config_text: str
    levels: list[LevelResult] = field(default_factory=list)
    load_error: str | None = None
    load_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "id": self.id,
            "description": c.describe(),
            "original": c.original,
            "instances": c.instances,
            "intra_op_thread_count": c.threads,
            "max_batch_size": c.max_batch_size,
            "preferred_batch_size": list(c.preferred),
            "max_queue_delay_microseconds": c.delay_us,
            "config": self.config_text,
            "load_error": self.load_error,
            "load_seconds": self.load_seconds,
            "levels": [level.as_dict() for level in self.levels],
        }


@dataclass(frozen=True)
class Point:
    result: ConfigResult
    level: LevelResult

    @property
    def p99_us(self) -> float:
        value = self.level.latency("p99")
        return float("inf") if value is None or math.isnan(value) else value

    def as_dict(self) -> dict[str, Any]:
        lat = self.level.latency_us
        return {"config": self.result.id, "description": self.result.candidate.describe(),
                "concurrency": int(self.level.value), "throughput": self.level.throughput,
                "p50_us": lat.get("p50"), "p99_us": lat.get("p99"), "status": self.level.status}


@dataclass(frozen=True)
class Selection:
    budget_ms: float
    #: The highest-throughput point within the budget; None when no point qualifies.
    best: Point | None
    #: The point with the lowest p99 (what to look at when nothing qualifies).
    lowest_latency: Point | None
    qualifying: int

    def as_dict(self) -> dict[str, Any]:
        return {"latency_budget_ms": self.budget_ms, "qualifying_points": self.qualifying,
                "best": self.best.as_dict() if self.best else None,
                "lowest_latency": self.lowest_latency.as_dict() if self.lowest_latency else None}


def usable(level: LevelResult) -> bool:
    """A point that can be compared: requests completed, none failed, p99 known."""
    p99 = level.latency("p99")
    return (level.completed > 0 and level.errors == 0 and level.status != "failed"
            and p99 is not None and not math.isnan(p99))


def points(results: Sequence[ConfigResult]) -> list[Point]:
    return [Point(r, level) for r in results for level in r.levels if usable(level)]


def select_best(results: Sequence[ConfigResult], budget_ms: float) -> Selection:
    """Highest throughput with p99 <= budget (ties: lower p99, then fewer instances, then sweep order)."""
    candidates = points(results)
    budget_us = budget_ms * 1e3
    qualifying = [p for p in candidates if p.p99_us <= budget_us]
    best = None
    if qualifying:
        best = min(qualifying, key=lambda p: (-p.level.throughput, p.p99_us, p.result.candidate.instances))
    lowest = min(candidates, key=lambda p: (p.p99_us, -p.level.throughput)) if candidates else None
    return Selection(budget_ms, best, lowest, len(qualifying))


def best_throughput_within(result: ConfigResult, budget_ms: float) -> LevelResult | None:
    """The config's own highest-throughput level within the budget (to compare with the original)."""
    within = [lv for lv in result.levels if usable(lv) and lv.latency("p99") <= budget_ms * 1e3]
    return max(within, key=lambda lv: lv.throughput) if within else None


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------


def _ms(us: float | None) -> str:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "-"
    return f"{us / 1e3:,.2f}"


def table(results: Sequence[ConfigResult], selection: Selection, title: str | None = None) -> Any:
    """One row per configuration and concurrency; the best row starred, p99 within the budget in green."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, justify in (("config", "left"), ("inst", "right"), ("threads", "right"), ("max batch", "right"),
                          ("preferred", "right"), ("delay us", "right"), ("conc", "right"), ("infer/s", "right"),
                          ("p50 ms", "right"), ("p99 ms", "right"), ("srv batch", "right"), ("status", "left")):
        t.add_column(name, justify=justify)
    budget_us = selection.budget_ms * 1e3
    best = selection.best
    for r in results:
        c = r.candidate
        fields = [
            ("★ " if best is not None and best.result is r else "") + r.id,
            str(c.instances),
            "auto" if c.threads is None else str(c.threads),
            "-" if c.max_batch_size is None else str(c.max_batch_size),
            ",".join(str(p) for p in c.preferred) or "-",
            str(c.delay_us) if (c.delay_us is not None and c.batching) else "-",
        ]
        if r.load_error is not None:
            t.add_row(*fields, "-", "-", "-", "-", "-", f"[red]load failed: {escape(r.load_error[:120])}[/red]")
            t.add_section()
            continue
        if not r.levels:
            t.add_row(*fields, "-", "-", "-", "-", "-", "[yellow]not measured[/yellow]")
            t.add_section()
            continue
        for level in r.levels:
            p99 = level.latency("p99")
            p99_text = _ms(p99)
            if usable(level):
                p99_text = f"[green]{p99_text}[/green]" if p99 <= budget_us else f"[yellow]{p99_text}[/yellow]"
            server = level.server or {}
            batch = server.get("avg_batch_size")
            status = level.status if not level.errors else f"{level.status}, {level.errors} errors"
            row = [*fields, str(int(level.value)), f"{level.throughput:,.1f}", _ms(level.latency("p50")), p99_text,
                   f"{batch:.2f}" if batch is not None else "-",
                   {"stable": "stable", "unstable": "[yellow]unstable[/yellow]"}.get(status, f"[red]{escape(status)}[/red]")]
            is_best = best is not None and best.level is level
            t.add_row(*row, style="bold" if is_best else None)
            fields = ["", "", "", "", "", ""]
        t.add_section()
    return t


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------


def write_plot(path: Path, results: Sequence[ConfigResult], selection: Selection, title: str,
               highlight: int = 5) -> None:
    """p99 latency against throughput, one line per configuration through its concurrency levels.

    Every configuration is a thin grey line; the original config, the best one
    and the next ``highlight - 1`` best within the budget are coloured and named.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    budget_us = selection.budget_ms * 1e3
    ranked = sorted(
        (r for r in results if best_throughput_within(r, selection.budget_ms) is not None),
        key=lambda r: -best_throughput_within(r, selection.budget_ms).throughput,
    )
    named = {r.id for r in ranked[:highlight]} | {r.id for r in results if r.candidate.original}
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    try:
        for r in results:
            levels = [lv for lv in r.levels if usable(lv)]
            if not levels:
                continue
            x = [lv.throughput for lv in levels]
            y = [lv.latency("p99") / 1e3 for lv in levels]
            is_best = selection.best is not None and selection.best.result is r
            if r.id in named or is_best:
                label = f"{r.id}: {r.candidate.describe()}" + (" (best)" if is_best else "")
                ax.plot(x, y, marker="o", linewidth=2.5 if is_best else 1.3, markersize=5 if is_best else 3.5,
                        label=label, zorder=3 if is_best else 2,
                        linestyle="--" if r.candidate.original else "-")
                for lv in levels:
                    ax.annotate(str(int(lv.value)), (lv.throughput, lv.latency("p99") / 1e3),
                                textcoords="offset points", xytext=(3, 3), fontsize=7)
            else:
                ax.plot(x, y, "-", color="0.75", linewidth=0.8, zorder=1)
        highest = max((lv.latency("p99") for r in results for lv in r.levels if usable(lv)), default=0.0)
        legend_title = "points: concurrency; grey: other configurations"
        if budget_us <= 3 * highest:
            ax.axhline(budget_us / 1e3, color="red", linestyle=":", linewidth=1.2,
                       label=f"p99 budget {selection.budget_ms:g} ms")
        else:  # a line far above every point would squash them
            legend_title += f"; p99 budget {selection.budget_ms:g} ms is above the chart"
        if selection.best is not None:
            b = selection.best
            ax.plot([b.level.throughput], [b.p99_us / 1e3], marker="*", markersize=16, color="gold",
                    markeredgecolor="black", zorder=4, linestyle="none")
        ax.set_xlabel("throughput (infer/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        # Outliers of configurations nobody would pick must not squash the ones that matter.
        shown = [lv.latency("p99") for r in results if r.id in named or (selection.best and selection.best.result is r)
                 for lv in r.levels if usable(lv)]
        top = max([1.3 * v for v in shown] + ([1.5 * budget_us] if budget_us <= 3 * highest else []), default=0.0)
        if top and highest > top:
            ax.set_ylim(0, top / 1e3)
            legend_title += "; higher points cut off"
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, title=legend_title, title_fontsize=7)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


__all__ = ["ConfigResult", "Point", "Selection", "best_throughput_within", "points", "select_best", "table",
           "usable", "write_plot"]
