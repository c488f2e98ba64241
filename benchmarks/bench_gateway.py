#!/usr/bin/env python
"""The gateway's cost: the same replica measured directly and through ``inferstack gateway``.

One run starts one replica (``inferstack serve`` with the MLP) and one gateway
in front of it, then alternates closed-loop measurements (concurrency 32,
keep-alive connections, pre-encoded binary-tensor bodies) directly against the
replica and through the gateway, ``--repeats`` times each, side by side so a
busy machine affects both alike. It prints throughput, p50 and p99 per run,
the medians, the throughput ratio (target >= 0.85) and the added p50 (target
<= 1 ms), and the gateway's CPU time per request (from /proc).

Example::

    .venv/bin/python benchmarks/bench_gateway.py --duration 5 --repeats 3 --json benchmarks/results/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from inferstack.perf import RawConnection, build_request
from inferstack.testing import onnx_models

CLK_TCK = os.sysconf("SC_CLK_TCK")
MLP_CONFIG = """
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[3]} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def request_body(batch: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)
    header = orjson.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [batch, 64],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    })
    return header + x.tobytes(), {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(header))}


async def measure(port: int, concurrency: int, duration: float, warmup: float, batch: int) -> dict[str, float]:
    body, headers = request_body(batch)
    data = build_request("POST", "/v2/models/mlp/infer", "127.0.0.1", port, body, headers)
    latencies: list[float] = []
    errors = 0
    state = {"record": False, "stop": False}

    async def worker() -> None:
        nonlocal errors
        connection = RawConnection("127.0.0.1", port, timeout=30)
        try:
            while not state["stop"]:
                started = time.perf_counter()
                status, _, _ = await connection.request(data)
                if state["record"]:
                    if status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
        finally:
            await connection.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    state["record"] = True
    began = time.perf_counter()
    await asyncio.sleep(duration)
    state["record"] = False
    elapsed = time.perf_counter() - began
    state["stop"] = True
    await asyncio.gather(*tasks)
    latencies.sort()
    n = len(latencies)
    return {"throughput": n / elapsed, "p50_ms": latencies[n // 2] * 1000 if n else float("nan"),
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
            "requests": n, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="direct/gateway pairs")
    parser.add_argument("--batch", type=int, default=1, help="samples per request")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    work = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    onnx_models.write_model(work / "repo", "mlp", onnx_models.mlp(), MLP_CONFIG)
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "gw_http", "gw_grpc", "gw_metrics")}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    replica = subprocess.Popen(
        [sys.executable, "-m", "inferstack", "serve", "--model-repository", str(work / "repo"), "--host", "127.0.0.1",
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
         "--metrics-port", str(ports["metrics"]), "--log-level", "warning"],
        stdout=open(work / "replica.log", "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    spec = (f"http://127.0.0.1:{ports['http']},grpc=127.0.0.1:{ports['grpc']},"
            f"metrics=127.0.0.1:{ports['metrics']}")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "inferstack", "gateway", "--replica", spec, "--host", "127.0.0.1",
         "--http-port", str(ports["gw_http"]), "--grpc-port", str(ports["gw_grpc"]),
         "--metrics-port", str(ports["gw_metrics"]), "--log-level", "warning"],
        stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    rows: list[dict[str, float | str]] = []
    try:
        wait_ready(f"http://127.0.0.1:{ports['http']}/v2/health/ready", replica)
        wait_ready(f"http://127.0.0.1:{ports['gw_http']}/v2/models/mlp/ready", gateway)
        for repeat in range(args.repeats):
            for target, port in (("direct", ports["http"]), ("gateway", ports["gw_http"])):
                gw_cpu, rep_cpu = cpu_seconds(gateway.pid), cpu_seconds(replica.pid)
                result = asyncio.run(measure(port, args.concurrency, args.duration, args.warmup, args.batch))
                gw_cpu, rep_cpu = cpu_seconds(gateway.pid) - gw_cpu, cpu_seconds(replica.pid) - rep_cpu
                # CPU over warmup + measurement, per request of the whole window (approximately).
                sent = max(1.0, result["throughput"] * (args.duration + args.warmup))
                result["gateway_cpu_us_per_request"] = gw_cpu / sent * 1e6 if target == "gateway" else 0.0
                result["replica_cpu_us_per_request"] = rep_cpu / sent * 1e6
                rows.append({"target": target, "repeat": repeat, **result})
                print(f"{target:8s} run {repeat}: {result['throughput']:8.0f} req/s  p50 {result['p50_ms']:6.2f} ms"
                      f"  p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}"
                      f"  CPU/req: replica {result['replica_cpu_us_per_request']:.0f} us"
                      + (f", gateway {result['gateway_cpu_us_per_request']:.0f} us"
                         if target == "gateway" else ""), flush=True)
    finally:
        for process in (gateway, replica):
            process.send_signal(signal.SIGTERM)
        for process in (gateway, replica):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def med(target: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r["target"] == target)

    direct_tp, gateway_tp = med("direct", "throughput"), med("gateway", "throughput")
    summary = {
        "concurrency": args.concurrency, "batch": args.batch, "cpus": os.cpu_count(),
        "direct_throughput": direct_tp, "gateway_throughput": gateway_tp,
        "throughput_ratio": gateway_tp / direct_tp,
        "direct_p50_ms": med("direct", "p50_ms"), "gateway_p50_ms": med("gateway", "p50_ms"),
        "added_p50_ms": med("gateway", "p50_ms") - med("direct", "p50_ms"),
        "direct_p99_ms": med("direct", "p99_ms"), "gateway_p99_ms": med("gateway", "p99_ms"),
        "load_average": os.getloadavg()[0],
        "gateway_cpu_us_per_request": med("gateway", "gateway_cpu_us_per_request"),
        "replica_cpu_us_per_request": med("direct", "replica_cpu_us_per_request"),
    }
    print(f"\nmedians over {args.repeats} runs, concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
          f"load average {summary['load_average']:.1f}:")
    print(f"  throughput  direct {direct_tp:.0f} req/s   gateway {gateway_tp:.0f} req/s   "
          f"ratio {summary['throughput_ratio']:.3f} (target >= 0.85)")
    print(f"  p50         direct {summary['direct_p50_ms']:.2f} ms   gateway {summary['gateway_p50_ms']:.2f} ms   "
          f"added {summary['added_p50_ms']:+.2f} ms (target <= 1 ms)")
    print(f"  p99         direct {summary['direct_p99_ms']:.2f} ms   gateway {summary['gateway_p99_ms']:.2f} ms")
    print(f"  CPU/request replica {summary['replica_cpu_us_per_request']:.0f} us   "
          f"gateway {summary['gateway_cpu_us_per_request']:.0f} us (the gateway's whole cost when it has its own cores)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps({"summary": summary, "runs": rows}, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
