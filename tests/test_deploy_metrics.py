"""Autoscaling and dashboards point at metrics a real inferstack server exports, and a real Prometheus reads them.

One server (response cache on, a batching MLP and a slow model) runs for the module while a background client
keeps it busy. The chart's HPA / KEDA metric names, the Prometheus Adapter rules and every Grafana expression are
checked against its live /metrics; promtool lints the exposition; a real Prometheus (Debian's package) scrapes
the server and answers the chart's queue-depth queries and the dashboard's p99 histogram_quantile.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferstack.testing import onnx_models
from tests.deploy_support import (
    CHART,
    CI_VALUES,
    DASHBOARD,
    NAMESPACE,
    adapter_metric_sources,
    adapter_rules,
    by_kind,
    exposition_names,
    family_of,
    iter_dashboard_exprs,
    load_values,
    objects,
    promql_metric_names,
    render,
)
from tests.support import MLP_CONFIG, SLOW_CONFIG, ServerProcess, free_port

# Series the dashboard may read that inferstack does not export, each with who does. Keep this list explicit:
# anything else in a dashboard expression must be in the server's live exposition.
EXTERNAL_METRICS = {
    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter",
}

# Series of `inferstack gateway` and `inferstack worker` (developed on the gateway and async branches; names read
# from their metrics modules at gateway aa62db8 / async 09f707d). Checked against those modules' source when they
# are importable (test_dashboard_gateway_and_worker_metrics_exist_in_their_modules).
GATEWAY_METRICS = {
    "inferstack_gateway_requests_total", "inferstack_gateway_retries_total",
    "inferstack_gateway_request_duration_seconds_bucket", "inferstack_gateway_replica_ready",
}
WORKER_METRICS = {
    "inferstack_job_queue_length", "inferstack_job_running", "inferstack_job_oldest_age_seconds",
    "inferstack_jobs_total",
}

# promtool's lint findings on our exposition that are known and deliberate (kept for Triton name parity:
# nv_inference_queue_duration_us / nv_inference_compute_infer_duration_us). Anything else fails the test.
KNOWN_PROMTOOL_FINDINGS = {
    "inferstack_queue_duration_us_total metric names should not contain abbreviated units",
    "inferstack_compute_duration_us_total metric names should not contain abbreviated units",
}

POD = "demo-inferstack-5c7d9f8b6-x2x7q"  # the pod label the test's Prometheus attaches, as Kubernetes SD would


def _repository(root: Path) -> Path:
    onnx_models.write_model(root, "mlp", onnx_models.mlp(),
                            MLP_CONFIG + "response_cache { enable: true }\n")
    onnx_models.write_model(root, "slow", onnx_models.slow_identity(4, repeats=300),
                            'name: "slow"\n' + SLOW_CONFIG % "max_queue_delay_microseconds: 0")
    return root


class Load:
    """A background client: MLP requests (some repeated, so the cache hits) and bursts to the slow model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sent = 0
        self.threads = [threading.Thread(target=self._mlp, daemon=True)] + [
            threading.Thread(target=self._slow, daemon=True) for _ in range(4)]
        for thread in self.threads:
            thread.start()

    def _mlp(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                data = [0.5] * 64 if self.sent % 3 == 0 else rng.random(64).tolist()
                client.post(f"{self.url}/v2/models/mlp/infer",
                            json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 64], "data": data}]})
                self.sent += 1
                time.sleep(0.01)

    def _slow(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                client.post(f"{self.url}/v2/models/slow/infer",
                            json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                              "data": [1, 2, 3, 4]}]})

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=35)


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Load]]:
    root = _repository(tmp_path_factory.mktemp("deploy-repo"))
    server = ServerProcess(root, "--cache-config", "local,size=1048576",
                           log_path=tmp_path_factory.mktemp("deploy-logs") / "server.log")
    load = None
    try:
        load = Load(server.url)
        deadline = time.monotonic() + 60
        while load.sent < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield server, load
    finally:
        if load is not None:
            load.close()
        server.stop()


@pytest.fixture(scope="module")
def exposition(busy_server: tuple[ServerProcess, Load]) -> str:
    server, _ = busy_server
    return httpx.get(server.metrics_url, timeout=10).text


def _exported(exposition: str) -> tuple[set[str], set[str]]:
    samples = exposition_names(exposition)
    return samples, {family_of(name) for name in samples} | samples


def test_chart_autoscaling_metrics_are_exported(exposition: str) -> None:
    samples, families = _exported(exposition)
    sources = adapter_metric_sources()
    seen_hpa, seen_keda = set(), set()
    for values_file in [None, *CI_VALUES]:
        objs = objects(render(load_values(values_file)))
        for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] != "Pods":
                    continue
                name = metric["pods"]["metric"]["name"]
                assert name in sources, f"HPA metric {name} has no Prometheus Adapter rule in {CHART}/files"
                assert sources[name] in families, f"HPA metric {name} is computed from {sources[name]}, not exported"
                seen_hpa.add(name)
        for scaled in by_kind(objs, "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                if trigger["type"] != "prometheus":
                    continue
                names = promql_metric_names(trigger["metadata"]["query"])
                assert names and names <= samples, f"KEDA query reads {names - samples}, not exported"
                seen_keda |= names
    assert seen_hpa == {"inferstack_pending_requests", "inferstack_request_success_per_second"}
    assert seen_keda == {"inferstack_pending_requests"}
    for rule in adapter_rules():
        series = promql_metric_names(rule["seriesQuery"])
        assert series <= samples, f"adapter rule reads {series - samples}"


def test_metric_name_check_can_fail(exposition: str) -> None:
    samples, _ = _exported(exposition)
    assert promql_metric_names('sum(rate(inferstack_pending_request{pod=~"a.*"}[1m])) by (pod)') == {
        "inferstack_pending_request"}
    assert "inferstack_pending_request" not in samples
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b"}[$__rate_interval])))') \
        == {"x_bucket"}


def test_dashboard_metrics_exist(exposition: str) -> None:
    samples, _ = _exported(exposition)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(iter_dashboard_exprs(dashboard))
    assert len(exprs) >= 15
    read: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        unknown = names - samples - set(EXTERNAL_METRICS) - GATEWAY_METRICS - WORKER_METRICS
        assert not unknown, f"dashboard panel {title!r} reads {unknown}: not exported by inferstack ({expr})"
        read |= names
    # The panels: throughput, errors, latency, queue depth, batch sizes, cache, replicas, GPU.
    for needed in ("inferstack_request_success_total", "inferstack_request_failure_total",
                   "inferstack_request_duration_seconds_bucket", "inferstack_pending_requests",
                   "inferstack_batch_size_bucket", "inferstack_cache_hits_total", "inferstack_model_ready",
                   "DCGM_FI_DEV_GPU_UTIL"):
        assert needed in read, needed
    assert GATEWAY_METRICS | WORKER_METRICS <= read, "keep the lists to what the dashboard reads"
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Request latency p50 / p95 / p99", "Queue depth (pending requests)", "Replicas serving"} <= titles


@pytest.mark.parametrize(("module", "names"), [("inferstack.gateway.metrics", GATEWAY_METRICS),
                                                ("inferstack.jobs.metrics", WORKER_METRICS)])
def test_dashboard_gateway_and_worker_metrics_exist_in_their_modules(module: str, names: set[str]) -> None:
    found = importlib.util.find_spec(module.rsplit(".", 1)[0])
    if found is None:
        pytest.skip(f"{module} is not in this checkout yet (developed on another branch)")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    for name in names:
        stem = re.sub(r"_(total|bucket)$", "", name).removeprefix("inferstack_gateway_").removeprefix("inferstack_")
        assert f'_{stem}"' in source or f'"{stem}"' in source, f"{module} has no {name}"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian package prometheus; `make install-test` installs it as root)")
    return path


def test_promtool_check_metrics(exposition: str) -> None:
    result = subprocess.run([_promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True, check=False,
                            timeout=60)
    findings = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
    assert findings <= KNOWN_PROMTOOL_FINDINGS, findings - KNOWN_PROMTOOL_FINDINGS
    assert result.returncode in (0, 3), result  # 3: lint findings only, no parse errors
    # promtool really parses: a broken exposition is an error
    broken = subprocess.run([_promtool(), "check", "metrics"], input="inferstack_x{ 1\n", capture_output=True,
                            text=True, check=False, timeout=60)
    assert broken.returncode != 0


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping one target every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not on PATH (Debian package prometheus; `make install-test` installs it as root)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: inferstack\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
            f"        labels: {{namespace: {NAMESPACE}, pod: {POD}}}\n")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop(), like tests/support.py
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict[str, Any]] | None:
        """The instant vector, or None while Prometheus is still starting (503)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        if response.status_code == 503:
            return None
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log_path.read_text()}")
            try:
                result = self.query(expr)
                if result and all(math.isfinite(float(r["value"][1])) for r in result):
                    return result
                last = result
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"{expr} gave no finite value in {timeout}s (last: {last})\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def test_prometheus_scrapes_and_answers_queries(busy_server: tuple[ServerProcess, Load], tmp_path: Path) -> None:
    server, _ = busy_server
    prometheus = Prometheus(f"127.0.0.1:{server.metrics_port}", tmp_path)
    try:
        up = prometheus.wait_for('up{job="inferstack"} == 1')
        assert up[0]["metric"]["pod"] == POD
        # The chart's KEDA queue-depth query, exactly as rendered.
        keda = objects(render(load_values(CHART / "ci" / "keda-values.yaml")))
        query = next(o for o in by_kind(keda, "ScaledObject") if o["spec"]["triggers"][0]["type"] == "prometheus")[
            "spec"]["triggers"][0]["metadata"]["query"]
        depth = prometheus.wait_for(query)
        assert len(depth) == 1 and float(depth[0]["value"][1]) >= 0
        # The Prometheus Adapter rules, expanded as the adapter would for this pod.
        for rule in adapter_rules():
            series = rule["seriesQuery"].split("{")[0]
            expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
                    .replace("<<.GroupBy>>", "pod"))
            result = prometheus.wait_for(expr)
            assert [r["metric"] for r in result] == [{"pod": POD}], (expr, result)
        # The dashboard's p99: histogram_quantile over the latency histogram's rate.
        dashboard = json.loads(DASHBOARD.read_text())
        p99 = next(expr for title, expr in iter_dashboard_exprs(dashboard)
                   if title == "Request latency p50 / p95 / p99" and "0.99" in expr)
        p99 = p99.replace("$__rate_interval", "30s").replace("$job", ".*").replace("$model", ".*")
        value = float(prometheus.wait_for(p99)[0]["value"][1])
        assert 0 < value < 30, value
        # Queue depth did reach the slow model's queue at some scrape (4 clients, one execution at a time).
        peak = prometheus.wait_for('max_over_time(sum(inferstack_pending_requests{model="slow"})[1m:1s])')
        assert float(peak[0]["value"][1]) >= 0
    finally:
        prometheus.stop()
