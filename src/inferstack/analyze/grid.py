"""The configurations ``inferstack analyze`` tries, and how long trying them takes.

A :class:`Candidate` is one point of the sweep: an instance count (with the
ONNX Runtime thread count that splits the cores between the instances),
and, for a model that batches, a ``max_batch_size``, an optional
``preferred_batch_size`` and a ``max_queue_delay_microseconds``.

:func:`build_grid` crosses the lists given on the command line and leaves out
the combinations that mean nothing:

* ``max_batch_size: 1`` batches nothing, so it is tried once per instance
  count, without a delay or preferred sizes;
* a preferred size is tried only below ``max_batch_size`` (equal to it is what
  the batcher does anyway, above it is invalid) and only with a delay > 0
  (without a delay a preferred size only caps batches below the maximum);
* a model that does not batch (``max_batch_size: 0``) gets instance counts only.

Pure functions, no I/O: unit-tested on their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Windows a stable level needs at least (perf's stability rule looks at the last three).
MIN_WINDOWS = 3
#: Guess of the seconds a reload plus the client set-up take per configuration, for the estimate.
RELOAD_SECONDS = 1.0


class GridError(ValueError):
    """A list option that cannot be used; the message names the option."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One configuration of the sweep (the swept fields only; the rest is the model's own config)."""

    instances: int
    #: ``intra_op_thread_count`` per instance; None: left as the model's config has it.
    threads: int | None = None
    #: None: the model does not batch, ``max_batch_size`` stays as it is.
    max_batch_size: int | None = None
    preferred: tuple[int, ...] = ()
    #: ``max_queue_delay_microseconds``; None: dynamic batching is not touched (or absent).
    delay_us: int | None = None
    #: The model's configuration as it is in the repository (measured for comparison).
    original: bool = False

    @property
    def batching(self) -> bool:
        return self.max_batch_size is not None and self.max_batch_size > 1

    def describe(self) -> str:
        """One line, e.g. ``2 instances x 1 thread, max batch 8, preferred [4], delay 100 us``."""
        threads = "auto threads" if self.threads is None else f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        parts = [f"{self.instances} instance{'s' if self.instances != 1 else ''} x {threads}"]
        if self.max_batch_size is not None:
            if self.max_batch_size == 0:
                parts.append("no batching")
            else:
                parts.append(f"max batch {self.max_batch_size}")
        if self.preferred:
            parts.append(f"preferred {list(self.preferred)}")
        if self.delay_us is not None and self.batching:
            parts.append(f"delay {self.delay_us} us")
        return ", ".join(parts)


def usable_cores() -> int:
    """CPUs this process may run on (affinity-aware), as the ONNX Runtime backend counts them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def thread_split(instances: int, cores: int) -> int:
    """Intra-op threads per instance so that instances x threads is about the cores (at least 1)."""
    return max(1, cores // max(1, instances))


def parse_int_list(text: str, option: str, *, minimum: int) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]`` (sorted, duplicates dropped); every value >= ``minimum``."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(item == "" for item in items):
        raise GridError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,4,8")
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise GridError(f"{option} {text!r}: {item!r} is not an integer") from None
        if value < minimum:
            raise GridError(f"{option} {text!r}: every value must be at least {minimum}, got {value}")
        values.append(value)
    return sorted(set(values))


def build_grid(*, max_instances: int, batch_sizes: Sequence[int], delays_us: Sequence[int],
               batching: bool, cores: int, preferred: Sequence[int] | None = None,
               quick: bool = False) -> list[Candidate]:
    """Every candidate of the sweep, instance count outermost.

    ``preferred``: the preferred sizes to try (each alone, below the max);
    None means one: the largest of ``batch_sizes`` below the max.
    ``quick``: instance counts 1 and 2, the largest batch size only, the
    smallest and largest delay only, no preferred sizes.
    """
    if max_instances < 1:
        raise GridError("--max-instances must be at least 1")
    instance_counts = list(range(1, max_instances + 1))
    sizes = sorted(set(batch_sizes))
    delays = sorted(set(delays_us))
    if batching and not sizes:
        raise GridError("--batch-sizes: give at least one size")
    if batching and not delays:
        raise GridError("--delays-us: give at least one delay")
    if quick:
        instance_counts = sorted({1, min(2, max_instances)})
        sizes = sizes[-1:]
        delays = sorted({delays[0], delays[-1]}) if delays else []
    grid: list[Candidate] = []
    for n in instance_counts:
        threads = thread_split(n, cores)
        if not batching:
            grid.append(Candidate(n, threads))
            continue
        for size in sizes:
            if size == 1:
                grid.append(Candidate(n, threads, 1))  # no batching: delays and preferred sizes mean nothing
                continue
            for delay in delays:
                grid.append(Candidate(n, threads, size, (), delay))
                if delay == 0 or quick:
                    continue
                for p in _preferred_for(size, sizes, preferred):
                    grid.append(Candidate(n, threads, size, (p,), delay))
    return grid


def _preferred_for(size: int, sizes: Sequence[int], preferred: Sequence[int] | None) -> Iterable[int]:
    if preferred is None:
        below = [p for p in sizes if 1 < p < size]
        return below[-1:]
    return [p for p in sorted(set(preferred)) if 1 < p < size]


def estimate_seconds(configs: int, levels: int, interval_s: float, max_trials: int,
                     reload_s: float = RELOAD_SECONDS) -> tuple[float, float]:
    """(shortest, longest) sweep time: every level stable after 3 windows, or every level at max trials."""
    fewest = min(MIN_WINDOWS, max_trials)
    per_level_overhead = 0.1  # lead before the first window, drain after the last
    low = configs * (reload_s + levels * (fewest * interval_s + per_level_overhead))
    high = configs * (reload_s + levels * (max_trials * interval_s + per_level_overhead))
    return low, high


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


__all__ = [
    "Candidate", "GridError", "build_grid", "estimate_seconds", "format_duration", "parse_int_list",
    "thread_split", "usable_cores",
]
