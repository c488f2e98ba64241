"""How many CPUs the backends size their threads for: cgroup quotas and --workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferstack.backends import resources as ort_backend


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert ort_backend.cgroup_cpu_limit(tmp_path) == 2.5


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert ort_backend.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert ort_backend.cgroup_cpu_limit(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert ort_backend.cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert ort_backend.cgroup_cpu_limit(tmp_path) is None


def test_usable_cores_takes_quota_and_workers_into_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_backend.os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr(ort_backend, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("INFERSTACK_WORKER_PROCESSES", raising=False)
    assert ort_backend.usable_cores() == 16
    monkeypatch.setattr(ort_backend, "cgroup_cpu_limit", lambda: 3.5)  # a 3500m limit: 4 threads
    assert ort_backend.usable_cores() == 4
    monkeypatch.setenv("INFERSTACK_WORKER_PROCESSES", "2")
    assert ort_backend.usable_cores() == 2
    monkeypatch.setenv("INFERSTACK_WORKER_PROCESSES", "8")
    assert ort_backend.usable_cores() == 1
