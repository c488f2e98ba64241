"""Gateway test helpers: replica repositories, replicas on fixed ports, the gateway process, a fast client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml

from inferstack.perf.clients import RawConnection, build_request
from inferstack.testing import onnx_models
from tests.support import MLP_CONFIG, READY_TIMEOUT, SLOW_CONFIG, ServerProcess, free_port, stop_process

ADMIN_TOKEN = "admin-secret-token"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_replica_repository(root: Path, *, slow_work: bool = False) -> Path:
    """The models every replica serves; ``slow_work``: this replica's 'work' model is slow."""
    w = onnx_models.write_model
    w(root, "mlp", onnx_models.mlp(), MLP_CONFIG)
    for version in (1, 2):
        w(root, "versioned", onnx_models.add_constant(float(version)), versions=(version,))
    (root / "versioned" / "config.pbtxt").write_text("max_batch_size: 8\nversion_policy: { all: {} }\n")
    w(root, "model_a", onnx_models.add_constant(10.0), "max_batch_size: 8")
    w(root, "model_a_copy", onnx_models.add_constant(10.0), "max_batch_size: 8")
    w(root, "model_b", onnx_models.add_constant(20.0), "max_batch_size: 8")
    if slow_work:
        w(root, "work", onnx_models.slow_identity(4, repeats=300), SLOW_CONFIG % "max_queue_delay_microseconds: 0")
    else:
        w(root, "work", onnx_models.add_constant(0.0), "max_batch_size: 16")
    return root


class Replica(ServerProcess):
    """A server on ports chosen up front, so it can be killed and started again on the same ones."""

    def __init__(self, repository: Path, *extra: str, log_path: Path, ports: tuple[int, int, int] | None = None,
                 wait_ready: bool = True) -> None:
        self.repository = repository
        self.extra = extra
        self.http_port, self.grpc_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        args = [
            sys.executable, "-m", "inferstack", "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
            "--grpc-port", str(self.grpc_port), *extra,
        ]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            self.wait_live()
            if wait_ready:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def spec(self) -> str:
        return f"{self.url},grpc={self.grpc_url},metrics={self.metrics_url}"

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        """SIGKILL: no drain, connections reset (the harshest failure)."""
        self.process.kill()
        self.process.wait()
        if not self._log.closed:
            self._log.close()

    def restart(self) -> Replica:
        return Replica(self.repository, *self.extra, log_path=self.log_path,
                       ports=(self.http_port, self.grpc_port, self.metrics_port))


class GatewayProcess:
    """``python -m inferstack gateway`` on free ports with a YAML config; always stop() it."""

    def __init__(self, config: dict[str, Any], workdir: Path, *extra: str, name: str = "gateway",
                 wait_ready: bool = True) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        args = [sys.executable, "-m", "inferstack", "gateway", "--config", str(self.config_path),
                "--host", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port), "--health-interval", "0.2", *extra]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            if wait_ready:
                self.wait("/v2/health/ready")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, path: str, timeout: float = READY_TIMEOUT, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + path, timeout=5, headers=headers)
                if response.status_code == 200:
                    return
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 after {timeout}s (last: {last}):\n{self.log()}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        text = httpx.get(self.metrics_url, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.process, self._log, timeout)


def infer_body(model_input: np.ndarray, parameters: dict[str, Any] | None = None) -> bytes:
    document: dict[str, Any] = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(model_input.shape),
                                            "data": model_input.flatten().tolist()}]}
    if parameters:
        document["parameters"] = parameters
    return orjson.dumps(document)


def output0(body: bytes) -> np.ndarray:
    document = orjson.loads(body)
    out = document["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


async def blast(url: str, path: str, bodies: list[bytes] | bytes, *, total: int, concurrency: int = 8,
                headers: dict[str, str] | None = None, stop: asyncio.Event | None = None
                ) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``total`` requests (or until ``stop``) with ``concurrency`` keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[int, dict[str, str], bytes]] = []
    counter = iter(range(total))
    extra = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(bodies, bytes):
        bodies = [bodies]
    requests = [build_request("POST", path, host, int(port), b, extra) for b in bodies]

    async def worker() -> None:
        connection = RawConnection(host, int(port), timeout=60)
        try:
            for i in counter:
                if stop is not None and stop.is_set():
                    break
                try:
                    results.append(await connection.request(requests[i % len(requests)]))
                except Exception as exc:  # noqa: BLE001 - a failure is a result the test counts
                    results.append((-1, {}, repr(exc).encode()))
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
