#!/usr/bin/env python
"""Per-request overhead of the Python backend, side by side in one run.

The same logic — Triton's add_sub on 16 floats — served five ways:

* ``onnx``: inferstack, ONNX Runtime backend (the floor: no Python model at all);
* ``py_triton``: inferstack, Python backend, a ``TritonPythonModel`` (the exact model.py Triton runs);
* ``py_typed``: inferstack, Python backend, the typed ``PythonModel`` API;
* ``triton_py``: NVIDIA Triton's own Python backend running that same model.py, from the
  ``tritonserver`` binary in the ``nvidia-pytriton`` wheel (``--pytriton-venv``; skipped if absent);
* ``ipc``: inferstack's worker round trip alone, ``PythonInstance.execute`` called in process
  (no HTTP/gRPC, no scheduler): what the process boundary itself costs.

For each server: sequential requests (concurrency 1) over gRPC and over HTTP with binary
tensors (tritonclient, same client code for every server), reporting mean / p50 / p99 latency,
then a closed loop at concurrency 8 over gRPC for throughput. The server-side ``compute_infer``
time per request (the statistics extension, same definition in both servers: the backend's
execute, including the trip to the Python process) isolates backend overhead from transport
and client cost. Overhead = Python model latency minus the ONNX model's on the same server.

    .venv/bin/python benchmarks/bench_python_backend.py --pytriton-venv /tmp/pyb-pytriton
    .venv/bin/python benchmarks/bench_python_backend.py --requests 500      # quicker

Results are printed and written to benchmarks/results/python_backend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from inferstack.testing import onnx_models  # noqa: E402
from tests.python_backend_support import ADD_SUB_MODEL  # noqa: E402
from tests.support import free_port  # noqa: E402

DIMS = 16
CONFIG = """
name: "%s"
backend: "%s"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

TYPED_MODEL = '''
from inferstack.python_backend import PythonModel


class AddSub(PythonModel):
    def predict(self, inputs):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
'''


def build_repository(root: Path, *, triton: bool) -> Path:
    def python_model(name: str, source: str) -> None:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(source)
        (root / name / "config.pbtxt").write_text(CONFIG % (name, "python"))

    python_model("py_triton", ADD_SUB_MODEL)
    if not triton:
        python_model("py_typed", TYPED_MODEL)
        onnx_models.write_model(root, "onnx", onnx_models.add_sub(DIMS), CONFIG % ("onnx", "onnxruntime"))
    return root


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_inferstack(repository: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "inferstack", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--log-level", "warning"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return process, http_port, grpc_port


def find_tritonserver(venv: Path) -> Path:
    """``pytriton/tritonserver`` (bin/tritonserver, backends/python, python_backend_stubs) in the venv."""
    for candidate in sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver")):
        if (candidate / "bin" / "tritonserver").is_file():
            return candidate
    raise FileNotFoundError(f"no pytriton/tritonserver/bin/tritonserver under {venv}")


def start_triton(venv: Path, repository: Path, work: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    """Run the wheel's tritonserver the way pytriton does: a copy of the server tree with the
    Python backend stub for this interpreter's version in backends/python, the wheel's bundled
    libraries on LD_LIBRARY_PATH, and the venv's bin first on PATH (the stub embeds Python and
    finds the venv, hence numpy, through it)."""
    source = find_tritonserver(venv)
    root = work / "tritonserver"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("python_backend_stubs"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(source / "python_backend_stubs" / version / "triton_python_backend_stub",
                root / "backends" / "python" / "triton_python_backend_stub")
    libs = source.parent.parent / "nvidia_pytriton.libs"
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    process = subprocess.Popen(
        [str(root / "bin" / "tritonserver"), "--model-repository", str(repository),
         "--backend-directory", str(root / "backends"), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--allow-metrics", "false",
         "--log-verbose", "0"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    return process, http_port, grpc_port


def _inputs(module, a: np.ndarray, b: np.ndarray) -> list:
    out = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, **({"binary_data": True} if module is httpclient else {}))
        out.append(tensor)
    return out


def _check(result, a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_us": statistics.fmean(ordered) * 1e6,
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


class Target:
    """One (server, model) pair with its clients and the samples gathered over the rounds."""

    def __init__(self, server: str, model: str, http_port: int, grpc_port: int) -> None:
        self.key = f"{server}:{model}"
        self.model = model
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.grpc = grpcclient.InferenceServerClient(self.grpc_url)
        self.http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        self.samples: dict[str, list[float]] = {"grpc": [], "http": []}
        self.rps: list[float] = []
        a = np.random.default_rng(1).random((1, DIMS), dtype=np.float32)
        b = np.random.default_rng(2).random((1, DIMS), dtype=np.float32)
        self.check = (a, b)
        self.inputs = {"grpc": _inputs(grpcclient, a, b), "http": _inputs(httpclient, a, b)}

    def client(self, protocol: str):
        return self.grpc if protocol == "grpc" else self.http

    def warm_up(self, n: int) -> None:
        for protocol in ("grpc", "http"):
            for _ in range(n):
                result = self.client(protocol).infer(self.model, self.inputs[protocol])
            _check(result, *self.check)

    def sequential(self, protocol: str, n: int) -> None:
        client, inputs, samples = self.client(protocol), self.inputs[protocol], self.samples[protocol]
        for _ in range(n):
            started = time.perf_counter()
            client.infer(self.model, inputs)
            samples.append(time.perf_counter() - started)

    def close(self) -> None:
        self.grpc.close()
        self.http.close()


def throughput(grpc_url: str, model: str, seconds: float, concurrency: int = 8) -> float:
    client = grpcclient.InferenceServerClient(grpc_url)
    a = np.ones((1, DIMS), np.float32)
    inputs = _inputs(grpcclient, a, a)
    counts = [0] * concurrency
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            client.infer(model, inputs)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    client.close()
    return sum(counts) / elapsed


def compute_us(http_url: str, model: str) -> float:
    """Server-side mean compute_infer per execution (µs), from the statistics extension."""
    stats = httpx.get(f"{http_url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    infer = stats["inference_stats"]["compute_infer"]
    executions = int(stats["execution_count"]) or 1
    return int(infer["ns"]) / executions / 1e3


def measure(targets: list[Target], n: int, seconds: float, rounds: int) -> dict[str, dict]:
    """Interleaved: every round runs n/rounds sequential requests per target and protocol, then
    a short concurrency-8 burst per target, so a busy machine's noise hits every target alike."""
    for target in targets:
        target.warm_up(max(50, n // 10))
    per_round = max(1, n // rounds)
    for index in range(rounds):
        for protocol in ("grpc", "http"):
            for target in targets:
                target.sequential(protocol, per_round)
        for target in targets:
            target.rps.append(throughput(target.grpc_url, target.model, seconds / rounds))
        print(f"  round {index + 1}/{rounds} done", flush=True)
    results = {}
    for target in targets:
        row = {
            "grpc": _summary(target.samples["grpc"]),
            "http": _summary(target.samples["http"]),
            "compute_infer_us": compute_us(target.http_url, target.model),
            "grpc_c8_rps": statistics.median(target.rps),
        }
        results[target.key] = row
        print(f"  {target.key:22s} grpc p50 {row['grpc']['p50_us']:6.0f} µs  http p50 "
              f"{row['http']['p50_us']:6.0f} µs  compute_infer {row['compute_infer_us']:6.0f} µs  "
              f"c8 {row['grpc_c8_rps']:6.0f} req/s", flush=True)
    return results


def _direct_call(instance):
    a = np.ones((1, DIMS), np.float32)
    inputs, outputs = {"INPUT0": a, "INPUT1": a}, ["OUTPUT0", "OUTPUT1"]
    if instance.per_request:
        return lambda: instance.execute_requests([(inputs, outputs, None)])
    return lambda: instance.execute(inputs, outputs)


def measure_ipc(repository: Path, n: int) -> dict[str, float]:
    """The worker round trip alone: PythonInstance.execute in this process."""
    from inferstack.backends.base import InstanceSpec
    from inferstack.backends.python import PythonBackend
    from inferstack.repository.config import read_config

    out = {}
    for model in ("py_triton", "py_typed"):
        config = read_config(repository / model, required=True)
        instance = PythonBackend().load(config, repository / model / "1" / "model.py", InstanceSpec(f"{model}_0", "KIND_CPU"))
        call = _direct_call(instance)
        for _ in range(200):
            call()
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        instance.unload()
        out[model] = _summary(samples)
        print(f"  ipc:{model:10s} round trip p50 {out[model]['p50_us']:6.1f} µs  mean {out[model]['mean_us']:6.1f} µs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per model and protocol")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="total duration of the concurrency-8 runs per target (split over the rounds)")
    parser.add_argument("--pytriton-venv", type=Path, default=HERE / ".venv-pytriton",
                        help="venv with nvidia-pytriton installed (its tritonserver binary)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "python_backend.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pybackend-"))
    results: dict[str, object] = {"requests": args.requests, "cpus": os.cpu_count()}
    try:
        repository = build_repository(work / "repo", triton=False)
        print("in-process worker round trip", flush=True)
        results["ipc"] = measure_ipc(repository, args.requests)

        processes: list[subprocess.Popen] = []
        targets: list[Target] = []
        try:
            process, http_port, grpc_port = start_inferstack(repository, work / "inferstack.log")
            processes.append(process)
            wait_ready(f"http://127.0.0.1:{http_port}", process)
            targets += [Target("inferstack", m, http_port, grpc_port) for m in ("onnx", "py_triton", "py_typed")]
            try:
                find_tritonserver(args.pytriton_venv)
            except FileNotFoundError as exc:
                print(f"triton: skipped ({exc})")
                results["triton_skipped"] = str(exc)
            else:
                triton_repo = build_repository(work / "triton_repo", triton=True)
                process, t_http, t_grpc = start_triton(args.pytriton_venv, triton_repo, work, work / "triton.log")
                processes.append(process)
                try:
                    wait_ready(f"http://127.0.0.1:{t_http}", process)
                    targets.append(Target("triton", "py_triton", t_http, t_grpc))
                except Exception as exc:  # noqa: BLE001 - reported, the rest of the run stands
                    log = (work / "triton.log").read_text(errors="replace")[-3000:]
                    print(f"triton failed to start: {exc}\n{log}")
                    results["triton_error"] = f"{exc}: {log}"
            print(f"measuring {', '.join(t.key for t in targets)} ({args.rounds} interleaved rounds)", flush=True)
            results.update(measure(targets, args.requests, args.seconds, args.rounds))
        finally:
            for target in targets:
                target.close()
            for process in processes:
                stop(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\noverhead of a Python model over the same logic in ONNX (inferstack), p50:")
    onnx = results["inferstack:onnx"]
    for key in ("inferstack:py_triton", "inferstack:py_typed", "triton:py_triton"):
        if key in results:
            row = results[key]
            print(f"  {key:22s} grpc +{row['grpc']['p50_us'] - onnx['grpc']['p50_us']:6.0f} µs  "
                  f"http +{row['http']['p50_us'] - onnx['http']['p50_us']:6.0f} µs  "
                  f"compute_infer {row['compute_infer_us']:6.0f} µs (onnx {onnx['compute_infer_us']:.0f} µs)")
    if "triton:py_triton" in results:
        ours, theirs = results["inferstack:py_triton"], results["triton:py_triton"]
        print("\ninferstack Python backend vs Triton Python backend (same model.py):")
        for what in ("grpc", "http"):
            print(f"  {what} p50 latency: {ours[what]['p50_us']:.0f} µs vs {theirs[what]['p50_us']:.0f} µs "
                  f"({theirs[what]['p50_us'] / ours[what]['p50_us']:.2f}x)")
        print(f"  compute_infer: {ours['compute_infer_us']:.0f} µs vs {theirs['compute_infer_us']:.0f} µs "
              f"({theirs['compute_infer_us'] / ours['compute_infer_us']:.2f}x)")
        print(f"  grpc c8 throughput: {ours['grpc_c8_rps']:.0f} vs {theirs['grpc_c8_rps']:.0f} req/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
