"""Test helpers: free ports, a real server in a subprocess, the test repository."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from inferstack.testing import onnx_models

READY_TIMEOUT = 120.0  # generous: a busy 2-core CI machine loads models slowly


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same one twice in this test session.

    The kernel may hand the port just released to the next bind(0), so two calls in a
    row (a server's HTTP, gRPC and metrics ports) could otherwise return the same port.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port after 100 tries")


class ServerProcess:
    """``python -m inferstack serve`` on free loopback ports; always stop() it."""

    def __init__(self, repository: Path, *extra: str, log_path: Path, wait_ready: bool = True) -> None:
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        args = [
            sys.executable, "-m", "inferstack", "serve",
            "--model-repository", str(repository),
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            "--grpc-port", str(self.grpc_port),
            *extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self.wait_live()
            if wait_ready:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + path, timeout=5)
                if response.status_code == 200:
                    return
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{path} not 200 after {timeout}s (last: {last}):\n{self.log()}")

    def wait_live(self, timeout: float = READY_TIMEOUT) -> None:
        self._wait("/v2/health/live", timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        self._wait("/v2/health/ready", timeout)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        return stop_process(self.process, self._log, timeout)


def stop_process(process: subprocess.Popen, log_file: IO[bytes], timeout: float) -> int:
    """SIGTERM a process the tests started, SIGKILL it if it has not exited within
    ``timeout``, close its log file; returns its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if not log_file.closed:
        log_file.close()
    return process.returncode


MLP_CONFIG = """
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""

SLOW_CONFIG = """
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { %s }
"""

ALL_DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]


def build_test_repository(root: Path) -> Path:
    """Every model the integration tests use, in one repository."""
    w = onnx_models.write_model
    w(root, "mlp", onnx_models.mlp(), MLP_CONFIG)
    w(root, "add_sub", onnx_models.add_sub(16), """
name: "add_sub"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
""")
    for datatype in ALL_DATATYPES:
        # No config.pbtxt: auto-completed from the ONNX graph.
        w(root, f"identity_{datatype.lower()}", onnx_models.identity(datatype))
    w(root, "identity_nobatch", onnx_models.identity("FP32", [2, 3], batch=False), """
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
""")
    w(root, "reshaped", onnx_models.identity("FP32", [4]), """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
""")
    w(root, "slow", onnx_models.slow_identity(4, repeats=200),
      SLOW_CONFIG % "max_queue_delay_microseconds: 0")
    w(root, "slow_small_queue", onnx_models.slow_identity(4, repeats=400),
      SLOW_CONFIG % "default_queue_policy { max_queue_size: 2 }")
    w(root, "slow_timeout", onnx_models.slow_identity(4, repeats=400), SLOW_CONFIG % """
default_queue_policy { default_timeout_microseconds: 1000 timeout_action: REJECT allow_timeout_override: true }
""")
    for version in (1, 2, 3):
        w(root, "versioned", onnx_models.add_constant(float(version)), versions=(version,))
    (root / "versioned" / "config.pbtxt").write_text("""
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
""")
    w(root, "broken_syntax", onnx_models.identity("FP32"), "max_batch_size: 4\ninput [ { name: \"X\" ")
    w(root, "broken_model", b"this is not an onnx model", "max_batch_size: 4")
    w(root, "wrong_config", onnx_models.identity("FP32"), """
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
""")
    return root
