"""Optional: build the image with podman and check it serves, passes its HEALTHCHECK, and runs as non-root.

There is no Docker daemon and no image registry in CI, so this runs only when asked:

    INFERSTACK_PODMAN_BASE_IMAGE=localhost/debian-python:bookworm pytest tests/test_deploy_image.py

The base image stands in for python:3.12-slim (unreachable here). It is built from Debian packages:

    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm rootfs
    ln -sf python3 rootfs/usr/bin/python
    cp /etc/ssl/certs/ca-certificates.crt rootfs/etc/ssl/certs/   # when PyPI is reached through a TLS proxy
    tar -C rootfs -c . | podman import - localhost/debian-python:bookworm

On hosts where crun cannot set rlimits or runs on hybrid cgroups, set INFERSTACK_PODMAN_RUNTIME=runc and point
CONTAINERS_CONF at a file with `[containers]\ndefault_ulimits = []`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import httpx
import pytest

from tests.deploy_support import ROOT
from tests.support import free_port

BASE = os.environ.get("INFERSTACK_PODMAN_BASE_IMAGE")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BASE, reason="optional image build: set INFERSTACK_PODMAN_BASE_IMAGE (see module doc)"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["podman"]
    if os.environ.get("INFERSTACK_PODMAN_RUNTIME"):
        command += ["--runtime", os.environ["INFERSTACK_PODMAN_RUNTIME"]]
    result = subprocess.run([*command, *args], capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_image_builds_serves_and_is_healthy() -> None:
    tag = f"localhost/inferstack-test:{uuid.uuid4().hex[:8]}"
    # docker format: the OCI image format has no HEALTHCHECK
    podman("build", "--format", "docker", "--network=host", "-f", "deploy/docker/Dockerfile",
           "--build-arg", f"PYTHON_IMAGE={BASE}", "-t", tag, str(ROOT), timeout=1200)
    name = f"inferstack-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
               "-v", f"{ROOT / 'examples' / 'model_repository'}:/models:ro", tag)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(podman("logs", name, check=False).stdout)
        assert podman("healthcheck", "run", name, check=False).returncode == 0, "HEALTHCHECK failed"
        response = httpx.post(f"{url}/v2/models/mlp/infer", timeout=30, json={
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 10]
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/models/x", check=False).returncode != 0, "/models is writable"
        podman("stop", "-t", "40", name, timeout=60)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0", "SIGTERM should drain and exit 0"
    finally:
        podman("rm", "-f", name, check=False)
        podman("rmi", "-f", tag, check=False)
