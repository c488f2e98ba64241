"""The Helm chart, rendered and linted by Helm's engine for each CI values file, every object validated.

Built-in kinds go through kubernetes-validate --strict (unknown fields are errors) for each version in
KUBE_VERSIONS; the KEDA ScaledObject and the ServiceMonitor go through pinned copies of their CRD schemas with
unknown fields rejected. Wrong values must fail with a message that names the keys to change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import (
    ADAPTER_RULES,
    CHART,
    CI_VALUES,
    CRD_SCHEMAS,
    KUBE_VERSIONS,
    ROOT,
    by_kind,
    crd_validator,
    helm,
    load_values,
    objects,
    one,
    render,
    render_error,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) missing")

SERVER = "demo-inferstack"
VALUES_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


def test_ci_values_files_cover_cpu_gpu_keda_gateway() -> None:
    assert {"cpu", "gpu", "keda", "gateway"} <= set(VALUES_IDS)


@pytest.fixture(scope="module", params=[None, *CI_VALUES], ids=["default", *VALUES_IDS])
def rendered(request: pytest.FixtureRequest) -> tuple[Path | None, list[dict[str, Any]]]:
    return request.param, objects(render(load_values(request.param)))


def test_helm_lint_strict(rendered: tuple[Path | None, list[dict[str, Any]]]) -> None:
    values_file, _ = rendered
    for version in KUBE_VERSIONS:
        report = helm().lint(str(CHART), load_values(values_file), strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert report["total_charts_linted"] == 1
        assert not problems, problems


def test_every_object_validates(rendered: tuple[Path | None, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    assert objs
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMAS:
            errors = sorted(crd_validator(*key).iter_errors(obj), key=str)
            assert not errors, f"{obj['kind']} {obj['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): "
                            f"{'/'.join(map(str, exc.absolute_path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"no schema for {key}: add a pinned CRD schema to CRD_SCHEMAS")


def test_strict_crd_validation_rejects_unknown_and_wrong_fields() -> None:
    """The pinned-schema check can fail: a typo and a wrong type are both caught."""
    obj = one(objects(render(load_values(CHART / "ci" / "keda-values.yaml"))), "ScaledObject", SERVER)
    validator = crd_validator("keda.sh/v1alpha1", "ScaledObject")
    assert not list(validator.iter_errors(obj))
    typo = {**obj, "spec": {**obj["spec"], "minReplicaCounts": 1}}
    assert any("minReplicaCounts" in e.message for e in validator.iter_errors(typo))
    wrong = {**obj, "spec": {**obj["spec"], "pollingInterval": "fast"}}
    assert list(validator.iter_errors(wrong))
    trigger = {**obj["spec"]["triggers"][0], "metdata": {}}
    assert list(validator.iter_errors({**obj, "spec": {**obj["spec"], "triggers": [trigger]}}))


def test_server_deployment_defaults() -> None:
    objs = objects(render())
    deployment = one(objs, "Deployment", SERVER)
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[0] == "serve" and "--strict-readiness" in args and "--exit-timeout-secs=30" in args
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # preStop 5 s + HTTP drain 30 s + model drain 30 s + 5 s margin
    assert pod["terminationGracePeriodSeconds"] == 70
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "inferstack-models", "readOnly": True}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert "nvidia.com/gpu" not in str(container["resources"])

    headless = one(objs, "Service", f"{SERVER}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    service = one(objs, "Service", SERVER)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert one(objs, "PodDisruptionBudget", SERVER)["spec"]["maxUnavailable"] == 1

    hpa = one(objs, "HorizontalPodAutoscaler", SERVER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert not by_kind(objs, "ScaledObject")


def test_gpu_values() -> None:
    objs = objects(render(load_values(CHART / "ci" / "gpu-values.yaml")))
    pod = one(objs, "Deployment", SERVER)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    # models synced from object storage by an init container into an emptyDir, mounted read-only
    sync = pod["initContainers"][0]
    assert sync["name"] == "sync-models"
    assert {"name": "MODEL_URI", "value": "s3://models-bucket/inferstack"} in sync["env"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["emptyDir"]["sizeLimit"] == "50Gi"
    hpa = one(objs, "HorizontalPodAutoscaler", SERVER)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]


def test_cpu_values_model_configs_and_ingress() -> None:
    objs = objects(render(load_values(CHART / "ci" / "cpu-values.yaml")))
    configmap = one(objs, "ConfigMap", f"{SERVER}-model-configs")
    assert "instance_group" in configmap["data"]["mlp.pbtxt"]
    pod = one(objs, "Deployment", SERVER)["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "model-configs")
    assert "ln -sfn" in init["args"][0]
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/source"]["readOnly"]
    hpa = one(objs, "HorizontalPodAutoscaler", SERVER)
    names = [m.get("pods", {}).get("metric", {}).get("name") or m["resource"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == ["cpu", "inferstack_pending_requests", "inferstack_request_success_per_second"]
    http, grpc = sorted(by_kind(objs, "Ingress"), key=lambda o: o["metadata"]["name"])
    assert http["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "128m"
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert grpc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["name"] == "grpc"
    monitor = one(objs, "ServiceMonitor", SERVER)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchExpressions"][0]["operator"] == "DoesNotExist"


def test_keda_values() -> None:
    objs = objects(render(load_values(CHART / "ci" / "keda-values.yaml")))
    assert not by_kind(objs, "HorizontalPodAutoscaler")
    scaled = one(objs, "ScaledObject", SERVER)
    assert scaled["spec"]["minReplicaCount"] == 0
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == 'sum(inferstack_pending_requests{namespace="ml",pod=~"demo-inferstack-.*"})'
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] == 300
    worker = one(objs, "Deployment", f"{SERVER}-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"][:2] == [
        "worker", "--redis-url=$(INFERSTACK_JOBS_REDIS_URL)"]
    assert "replicas" not in worker["spec"]
    worker_trigger = one(objs, "ScaledObject", f"{SERVER}-worker")["spec"]["triggers"][0]
    assert worker_trigger["type"] == "redis-streams"
    # the stream's length (queued + running jobs), not the consumer group's pending entries (running only)
    assert worker_trigger["metadata"] == {"address": "redis.inferstack.svc:6379", "stream": "inferstack:jobs:stream",
                                          "streamLength": "10", "activationLagCount": "0"}


def test_gateway_values() -> None:
    objs = objects(render(load_values(CHART / "ci" / "gateway-values.yaml")))
    gateway = one(objs, "Deployment", f"{SERVER}-gateway")
    pod = gateway["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args == ["gateway", "--http-port=9000", "--grpc-port=9001", "--metrics-port=9002",
                    "--config=/etc/inferstack/gateway.yaml", "--state-file=/var/lib/inferstack-gateway/state.json"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/var/lib/inferstack-gateway"] == "state" and mounts["/etc/inferstack"] == "config"
    config = yaml.safe_load(one(objs, "ConfigMap", f"{SERVER}-gateway")["data"]["gateway.yaml"])
    assert config["replicas"]["dns"] == [{"name": "demo-inferstack-headless.ml.svc.cluster.local", "http_port": 8000,
                                          "grpc_port": 8001, "metrics_port": 8002, "interval_s": 10}]
    assert config["routing"]["max_attempts"] == 3  # gateway.config merged in
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(objs, "Service", f"{SERVER}-gateway")
    assert one(objs, "PodDisruptionBudget", f"{SERVER}-gateway")
    ingress = one(objs, "Ingress", SERVER)
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == f"{SERVER}-gateway"
    assert {m["metadata"]["name"] for m in by_kind(objs, "ServiceMonitor")} == {SERVER, f"{SERVER}-gateway"}
    static = objects(render({"gateway": {"enabled": True, "discovery": {"enabled": False},
                                         "config": {"replicas": {"static": ["http://10.0.0.1:8000"]}}}}))
    config = yaml.safe_load(one(static, "ConfigMap", f"{SERVER}-gateway")["data"]["gateway.yaml"])
    assert config == {"replicas": {"static": ["http://10.0.0.1:8000"]}}


def test_fixed_replicas_without_autoscaler() -> None:
    objs = objects(render({"autoscaling": {"hpa": {"enabled": False}}, "server": {"replicaCount": 3}}))
    assert one(objs, "Deployment", SERVER)["spec"]["replicas"] == 3
    assert not by_kind(objs, "HorizontalPodAutoscaler")


KEDA_ON = {"enabled": True, "prometheus": {"serverAddress": "http://prometheus:9090"}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"autoscaling": {"hpa": {"minReplicas": 5, "maxReplicas": 3}}},
         "autoscaling.hpa.minReplicas (5) is greater than autoscaling.hpa.maxReplicas (3)"),
        ({"autoscaling": {"keda": KEDA_ON}},
         ("autoscaling.hpa.enabled and autoscaling.keda.enabled are both true: both would scale Deployment "
          "demo-inferstack")),
        ({"autoscaling": {"hpa": {"enabled": False}, "keda": {**KEDA_ON, "minReplicas": 4, "maxReplicas": 2}}},
         "autoscaling.keda.minReplicas (4) is greater than autoscaling.keda.maxReplicas (2)"),
        ({"autoscaling": {"hpa": {"enabled": False}, "keda": {"enabled": True}}},
         "autoscaling.keda.enabled needs autoscaling.keda.prometheus.serverAddress"),
        ({"autoscaling": {"hpa": {"minReplicas": 0}}}, "autoscaling.hpa.minReplicas must be at least 1"),
        ({"autoscaling": {"hpa": {"cpu": {"enabled": False}, "pendingRequests": {"enabled": False}}}},
         "autoscaling.hpa.enabled is true but no metric is enabled"),
        ({"server": {"resources": {"requests": {"cpu": None}}}},
         "autoscaling.hpa.cpu.enabled needs server.resources.requests.cpu"),
        ({"server": {"modelRepository": {"source": "nfs"}}},
         'server.modelRepository.source must be pvc, objectStorage or image (got "nfs")'),
        ({"server": {"modelRepository": {"pvc": {"claimName": ""}}}},
         "server.modelRepository.pvc.claimName is empty"),
        ({"server": {"modelRepository": {"source": "objectStorage"}}},
         "server.modelRepository.objectStorage.uri is empty"),
        ({"server": {"podDisruptionBudget": {"minAvailable": 1}}},
         "server.podDisruptionBudget: set minAvailable or maxUnavailable, not both"),
        ({"worker": {"keda": {"enabled": True}}}, "worker.keda.enabled needs worker.enabled"),
        ({"worker": {"enabled": True}}, "worker.enabled needs worker.redisUrl"),
        ({"modelConfigs": {"bad/name": "max_batch_size: 1"}}, '"bad/name" is not a usable model name'),
        ({"ingress": {"enabled": True, "grpc": {"enabled": True}}}, "ingress.grpc.enabled needs ingress.grpc.host"),
        ({"server": {"gpu": {"enabled": True, "count": 0}}}, "server.gpu.count must be at least 1"),
        ({"gateway": {"enabled": True, "discovery": {"enabled": False}}}, "the gateway has no replicas"),
    ],
    ids=["hpa-min-gt-max", "hpa-and-keda", "keda-min-gt-max", "keda-no-prometheus", "hpa-min-zero",
         "hpa-no-metric", "cpu-metric-no-request", "bad-source", "pvc-no-claim", "object-storage-no-uri",
         "pdb-both", "worker-keda-no-worker", "worker-no-redis", "bad-model-name", "grpc-ingress-no-host",
         "gpu-zero", "gateway-no-replicas"],
)
def test_wrong_values_fail_clearly(values: dict[str, Any], message: str) -> None:
    error = render_error(values)
    assert message in error, error


def test_readme_documents_every_value_and_the_adapter_rules() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart_values_doc.py"), "--check"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (CHART / "README.md").read_text()
    rules = ADAPTER_RULES.read_text()
    assert rules[rules.index("rules:"):].strip() in readme
    assert "<!-- values:begin -->\n| key | default | description |" in readme
