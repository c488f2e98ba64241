"""scripts/scaling_sim.py: the HPA algorithm it replays (tolerance, stabilization windows, rate policies, bounds)
against hand-computed cases, and the simulation end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("scaling_sim", ROOT / "scripts" / "scaling_sim.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["scaling_sim"] = sim
_spec.loader.exec_module(sim)

CHART = sim.chart_autoscaling()


def chart_hpa(min_replicas: int = 2, max_replicas: int = 50) -> sim.Hpa:
    return sim.Hpa(min_replicas, max_replicas, CHART["behavior"])


def test_chart_behavior_is_fast_up_slow_down() -> None:
    behavior = CHART["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_desired_for_tolerance_and_ceiling() -> None:
    hpa = chart_hpa()
    assert hpa.desired_for(4, 8.6, 8) == 4        # 7.5% over target: inside the 10% tolerance
    assert hpa.desired_for(4, 9.0, 8) == 5        # ceil(4 * 1.125)
    assert hpa.desired_for(4, 2.0, 8) == 1
    assert hpa.desired_for(3, 100, 70) == 5       # CPU saturates at 100%: at most x1.43 per sync


def test_scale_up_policies_double_or_plus_four_per_15s() -> None:
    hpa = chart_hpa()
    assert hpa.step(0, 2, [40]) == 6              # max(Percent 100: 4, Pods 4: 2 + 4)
    assert hpa.step(10, 6, [40]) == 6             # both periods still count the +4 made at t=0
    assert hpa.step(15, 6, [40]) == 12            # new period: max(12, 10)
    assert hpa.step(30, 12, [40]) == 24
    assert hpa.step(45, 24, [40]) == 40           # desired reached
    assert hpa.step(60, 40, [80]) == 50           # clamped to maxReplicas


def test_scale_down_waits_for_the_window_then_one_pod_per_minute() -> None:
    hpa = chart_hpa()
    assert hpa.step(0, 10, [10]) == 10
    for t in range(15, 300, 15):
        assert hpa.step(t, 10, [3]) == 10, t     # the 10 recommended at t=0 is inside the 300 s window
    assert hpa.step(300, 10, [3]) == 9            # window passed: one pod
    assert hpa.step(315, 9, [3]) == 9             # one pod per 60 s
    assert hpa.step(360, 9, [3]) == 8
    assert hpa.step(420, 8, [1]) == 7
    floor = chart_hpa(min_replicas=7)
    assert floor.step(0, 7, [1]) == 7             # never below minReplicas


def test_default_behavior_drops_fast_after_the_window() -> None:
    hpa = sim.Hpa(1, 50, sim.DEFAULT_BEHAVIOR)
    assert hpa.step(0, 10, [10]) == 10
    assert hpa.step(285, 10, [2]) == 10           # the 10 from t=0 is inside the window
    assert hpa.step(300, 10, [2]) == 2            # window passed (kube: recommendation time After cutoff);
                                                  # Percent 100 per 15 s: straight down


def test_simulation_scales_up_under_overload_and_back_down() -> None:
    capacity = 1000.0
    load = np.concatenate([np.full(120, 800.0), np.full(300, 4000.0), np.full(900, 500.0)])
    hpa = chart_hpa(min_replicas=1, max_replicas=10)
    result = sim.simulate(load, capacity, hpa, cpu_target=70, pending_target=8, start_replicas=1, cold_start=30)
    assert result.replicas[100] <= 2
    assert result.replicas[400] >= 5              # 4000 req/s needs 4 replicas at 100%, 6 at 70%
    assert result.queue_per_pod[130:200].max() > 8  # the burst queues before new pods are ready
    assert result.wait_s[380:420].max() < 0.05    # and drains once they are
    assert result.replicas[-1] < result.replicas[400]
    summary = result.summary(load, capacity)
    assert summary["peak_replicas"] == result.replicas.max()


def test_run_writes_a_small_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    lines: list[str] = []
    report = sim.run(capacity=2000, seconds=900, base=None, plot=tmp_path / "sim.png", cold_start=45,
                     out=lines.append)
    assert set(report["results"]) == {"chart behavior", "Kubernetes default behavior", "no scale-down window",
                                      "CPU metric only"}
    size = (tmp_path / "sim.png").stat().st_size
    assert 10_000 < size < 200_000
    assert lines and '"chart behavior"' in lines[0]


def test_committed_plot_is_small() -> None:
    assert (ROOT / "docs" / "scaling_sim.png").stat().st_size < 200_000
