"""What backends share: how many CPUs a model may use, and integer parameters.

Every backend sizes its thread pools from ``usable_cores()`` so that CPU limits
(affinity, a cgroup quota, ``serve --workers``) are honoured the same way.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from inferstack._proto import model_config_pb2 as mc
from inferstack.repository.config import ModelConfigError, parameter


def usable_cores() -> int:
    """CPUs this process may use: affinity-aware (unlike os.cpu_count()), capped by a
    cgroup CPU quota (a Kubernetes CPU limit: a pod limited to 2 CPUs on a 64-core node
    must not start 64 threads per session), and divided between the worker processes
    of ``serve --workers N`` (each loads its own models)."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    try:
        processes = int(os.environ.get("INFERSTACK_WORKER_PROCESSES", "1"))
    except ValueError:
        processes = 1
    return max(1, cores // max(1, processes))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this process's cgroup in CPUs, or None when unlimited or unknown.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``;
    cgroup v1: ``cpu/cpu.cfs_quota_us`` (-1 when unlimited) and ``cpu.cfs_period_us``.
    """
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def int_parameter(config: mc.ModelConfig, key: str) -> int:
    value = parameter(config, key)
    if value is None or value == "":
        return 0
    try:
        number = int(value)
    except ValueError:
        raise ModelConfigError(f"parameter {key!r} must be an integer, got {value!r}") from None
    if number < 0:
        raise ModelConfigError(f"parameter {key!r} must be >= 0, got {number}")
    return number
