"""Replay a bursty load trace through the Kubernetes HPA algorithm with a measured per-replica capacity.

Shows what the chart's autoscaling settings (read from deploy/helm/inferstack/values.yaml: targets, min/max,
`behavior`) do to replica count and queue depth when load jumps, and compares them with other behaviors.

    python scripts/scaling_sim.py --capacity 5000 --plot docs/scaling_sim.png

The HPA part follows kube-controller-manager's podautoscaler (v1.30): per-metric desired replicas
ceil(ready * value / target) with a 10% tolerance, the largest over metrics, then stabilization windows
(scale up to the smallest, down to the largest recommendation inside the window), then the scaleUp/scaleDown
rate policies (selectPolicy Max: the most permissive), clamped to [min, max]. One sync every 15 s.

The serving part is a fluid queue per second: arrivals from the trace, each READY replica completes up to
`capacity` requests/s, the rest waits; a new pod serves only after `cold_start` seconds (image pull, model load,
warmup: the startup probe). The queue-depth metric per pod adds the M/D/1 mean queue rho^2 / (2 (1 - rho)) to
the backlog, as a batching server has a few requests waiting even below saturation. Metrics reach the HPA
`metric_lag` seconds late (scrape interval plus the adapter's query).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "deploy" / "helm" / "inferstack" / "values.yaml"
TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
SYNC_PERIOD = 15  # --horizontal-pod-autoscaler-sync-period, seconds
# Kubernetes' behavior when the HPA spec sets none.
DEFAULT_BEHAVIOR: dict[str, Any] = {
    "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                             {"type": "Pods", "value": 4, "periodSeconds": 15}]},
    "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                  "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
}


@dataclass
class Hpa:
    """The HPA controller's state for one target: recommendations and scale events, as kube keeps them."""

    min_replicas: int
    max_replicas: int
    behavior: dict[str, Any]
    recommendations: list[tuple[float, int]] = field(default_factory=list)  # (time, raw desired)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, +added / -removed)

    def desired_for(self, ready: int, value: float, target: float) -> int:
        """One metric's proposal: ceil(ready * value / target), unchanged inside the tolerance."""
        ratio = value / target
        if abs(ratio - 1.0) <= TOLERANCE:
            return ready
        return math.ceil(ratio * ready)

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_window = self.behavior["scaleUp"].get("stabilizationWindowSeconds", 0)
        down_window = self.behavior["scaleDown"].get("stabilizationWindowSeconds", 300)
        up, down = desired, desired
        for when, recommendation in self.recommendations:
            if when > now - up_window:
                up = min(up, recommendation)
            if when > now - down_window:
                down = max(down, recommendation)
        keep = max(up_window, down_window)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep]
        self.recommendations.append((now, desired))
        result = current
        result = max(result, up)
        result = min(result, down)
        return result

    def _changed_in(self, now: float, period: float, sign: int) -> int:
        return sum(abs(n) for t, n in self.events if t > now - period and n * sign > 0)

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        if desired > current:
            rules = self.behavior["scaleUp"]
            limits = []
            for policy in rules.get("policies", []):
                start = current - self._changed_in(now, policy["periodSeconds"], +1)
                if policy["type"] == "Pods":
                    limits.append(start + policy["value"])
                else:
                    limits.append(math.ceil(start * (1 + policy["value"] / 100)))
            if not limits or rules.get("selectPolicy") == "Disabled":
                return current
            limit = min(limits) if rules.get("selectPolicy") == "Min" else max(limits)
            return min(desired, limit, self.max_replicas)
        if desired < current:
            rules = self.behavior["scaleDown"]
            limits = []
            for policy in rules.get("policies", []):
                start = current + self._changed_in(now, policy["periodSeconds"], -1)
                if policy["type"] == "Pods":
                    limits.append(start - policy["value"])
                else:
                    limits.append(math.floor(start * (1 - policy["value"] / 100)))
            if not limits or rules.get("selectPolicy") == "Disabled":
                return current
            limit = max(limits) if rules.get("selectPolicy") == "Min" else min(limits)
            return max(desired, limit, self.min_replicas)
        return desired

    def step(self, now: float, current: int, proposals: list[int]) -> int:
        """One sync: the new replica count from each metric's proposal."""
        desired = max(proposals) if proposals else current
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        stabilized = self._stabilize(now, current, desired)
        final = self._rate_limit(now, current, stabilized)
        final = max(self.min_replicas, min(self.max_replicas, final))
        if final != current:
            self.events.append((now, final - current))
            self.events = [(t, n) for t, n in self.events if t > now - 1800]
        return final


def bursty_trace(seconds: int, base: float, seed: int = 1) -> np.ndarray:
    """Requests/s per second: a daily-ish ramp, two plateaus, a flash spike and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds)
    load = base * (1.0 + 0.5 * np.sin(2 * np.pi * t / seconds))  # slow wave
    def bump(start: int, length: int, height: float, ramp: int = 30) -> None:
        up = np.clip((t - start) / ramp, 0, 1)
        down = np.clip((start + length - t) / ramp, 0, 1)
        load[:] += height * base * np.minimum(up, down)
    bump(int(seconds * 0.15), 420, 2.0)              # a campaign: 3x for 7 minutes
    bump(int(seconds * 0.45), 60, 2.5, ramp=5)       # a flash spike: 3.5x for a minute
    bump(int(seconds * 0.65), 900, 1.0, ramp=120)    # a slow rise and fall
    for start in range(0, seconds, 97):               # short bursts every ~1.5 min
        bump(start + int(rng.integers(0, 60)), 20, float(rng.uniform(0.2, 0.8)), ramp=3)
    return np.maximum(load * rng.normal(1.0, 0.05, seconds), 0.0)


@dataclass
class Result:
    replicas: np.ndarray  # spec replicas
    ready: np.ndarray
    queue_per_pod: np.ndarray
    wait_s: np.ndarray  # mean wait of a request arriving now (backlog / capacity)
    cpu: np.ndarray
    dropped: float

    def summary(self, load: np.ndarray, capacity: float) -> dict[str, float]:
        changes = int(np.count_nonzero(np.diff(self.replicas)))
        return {
            "peak_replicas": int(self.replicas.max()),
            "replica_minutes": float(self.replicas.sum() / 60),
            "static_peak_replica_minutes": float(math.ceil(load.max() / capacity / 0.7) * len(load) / 60),
            "max_queue_per_pod": float(self.queue_per_pod.max()),
            "p99_wait_ms": float(np.percentile(self.wait_s, 99) * 1000),
            "max_wait_s": float(self.wait_s.max()),
            "seconds_backlogged": int(np.count_nonzero(self.wait_s > 0.05)),
            "scale_changes": changes,
            "dropped_requests": float(self.dropped),
        }


def simulate(load: np.ndarray, capacity: float, hpa: Hpa, *, cpu_target: float | None, pending_target: float | None,
             start_replicas: int, cold_start: int = 45, metric_lag: int = 15, max_queue_per_pod: float = 1024,
             ) -> Result:
    n = len(load)
    replicas = np.zeros(n, int)
    ready_out = np.zeros(n, int)
    queue_pp = np.zeros(n)
    wait = np.zeros(n)
    cpu = np.zeros(n)
    spec = start_replicas
    pods_ready_at: list[int] = [0] * start_replicas  # second each pod becomes ready
    backlog = 0.0
    dropped = 0.0
    for second in range(n):
        ready = sum(1 for r in pods_ready_at if r <= second)
        served_capacity = ready * capacity
        demand = backlog + load[second]
        served = min(demand, served_capacity)
        backlog = demand - served
        limit = max_queue_per_pod * max(ready, 1)
        if backlog > limit:  # --max-queue-size: a full queue answers 503
            dropped += backlog - limit
            backlog = limit
        rho = min(load[second] / served_capacity, 0.95) if served_capacity else 0.95
        queue_pp[second] = backlog / max(ready, 1) + rho * rho / (2 * (1 - rho))
        wait[second] = backlog / served_capacity if served_capacity else float("inf")
        cpu[second] = 100.0 * min(served / served_capacity, 1.0) if served_capacity else 100.0
        ready_out[second] = ready
        if second and second % SYNC_PERIOD == 0:
            seen = max(second - metric_lag, 0)
            proposals = []
            seen_ready = max(ready_out[seen], 1)
            if cpu_target is not None:
                proposals.append(hpa.desired_for(seen_ready, cpu[seen], cpu_target))
            if pending_target is not None:
                proposals.append(hpa.desired_for(seen_ready, queue_pp[seen], pending_target))
            new = hpa.step(float(second), spec, proposals)
            if new > spec:
                pods_ready_at += [second + cold_start] * (new - spec)
            elif new < spec:
                # the newest pods go first (ReplicaSet prefers not-ready and younger pods)
                pods_ready_at = sorted(pods_ready_at)[: new]
            spec = new
        replicas[second] = spec
    return Result(replicas, ready_out, queue_pp, wait, cpu, dropped)


def chart_autoscaling() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(VALUES.read_text())["autoscaling"]["hpa"]


def run(capacity: float, seconds: int, base: float | None, plot: Path | None, cold_start: int,
        out: Callable[[str], None] = print) -> dict[str, Any]:
    chart = chart_autoscaling()
    base = base if base is not None else capacity
    load = bursty_trace(seconds, base)
    cpu_target = float(chart["cpu"]["averageUtilization"]) if chart["cpu"]["enabled"] else None
    pending_target = float(chart["pendingRequests"]["averageValue"]) if chart["pendingRequests"]["enabled"] else None
    variants: dict[str, dict[str, Any]] = {
        "chart behavior": chart["behavior"],
        "Kubernetes default behavior": DEFAULT_BEHAVIOR,
        "no scale-down window": {**chart["behavior"], "scaleDown": {
            "stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}},
    }
    results: dict[str, Result] = {}
    summaries: dict[str, Any] = {}
    for name, behavior in variants.items():
        hpa = Hpa(chart["minReplicas"], chart["maxReplicas"], behavior)
        results[name] = simulate(load, capacity, hpa, cpu_target=cpu_target, pending_target=pending_target,
                                 start_replicas=chart["minReplicas"], cold_start=cold_start)
        summaries[name] = results[name].summary(load, capacity)
    cpu_only = Hpa(chart["minReplicas"], chart["maxReplicas"], chart["behavior"])
    results["CPU metric only"] = simulate(load, capacity, cpu_only, cpu_target=cpu_target, pending_target=None,
                                          start_replicas=chart["minReplicas"], cold_start=cold_start)
    summaries["CPU metric only"] = results["CPU metric only"].summary(load, capacity)
    report = {"capacity_rps_per_replica": capacity, "seconds": seconds, "base_rps": base,
              "peak_rps": float(load.max()), "cold_start_s": cold_start, "cpu_target": cpu_target,
              "pending_target": pending_target, "results": summaries}
    out(json.dumps(report, indent=1))
    if plot is not None:
        _plot(load, capacity, results, plot)
    return report


def _plot(load: np.ndarray, capacity: float, results: dict[str, Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = np.arange(len(load)) / 60
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True, dpi=80)
    main = results["chart behavior"]
    axes[0].plot(minutes, load, lw=0.8, color="0.3", label="offered load (req/s)")
    axes[0].plot(minutes, main.ready * capacity, lw=1.2, color="tab:green", label="ready capacity (chart behavior)")
    axes[0].set_ylabel("req/s")
    axes[0].legend(loc="upper left", fontsize=8)
    styles = {"chart behavior": "tab:blue", "Kubernetes default behavior": "tab:orange",
              "no scale-down window": "tab:red", "CPU metric only": "tab:purple"}
    for name, result in results.items():
        axes[1].step(minutes, result.replicas, where="post", lw=1.1, color=styles[name], label=name)
    axes[1].set_ylabel("replicas (spec)")
    axes[1].legend(loc="upper left", fontsize=8)
    for name in ("chart behavior", "CPU metric only"):
        axes[2].plot(minutes, results[name].queue_per_pod, lw=0.9, color=styles[name], label=name)
    axes[2].set_yscale("symlog", linthresh=10)
    axes[2].set_ylabel("pending requests / pod")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"HPA replay: {capacity:,.0f} req/s per replica, targets from the chart's values.yaml", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=float, required=True,
                        help="Measured requests/s one replica sustains within its latency budget (inferstack perf).")
    parser.add_argument("--seconds", type=int, default=3600, help="Trace length.")
    parser.add_argument("--base", type=float, default=None, help="Baseline req/s (default: one replica's capacity).")
    parser.add_argument("--cold-start", type=int, default=45, help="Seconds from pod creation to READY.")
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG (needs matplotlib).")
    parser.add_argument("--json", type=Path, default=None, help="Write the summary as JSON.")
    args = parser.parse_args()
    report = run(args.capacity, args.seconds, args.base, args.plot, args.cold_start)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
