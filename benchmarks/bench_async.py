"""Async jobs vs synchronous inference, and the Redis response cache vs the model, in one run.

1. **MLP, jobs/s**: the same N batch-1 requests, C clients in a closed loop,
   (a) synchronous ``POST /infer``; (b) ``POST /infer/async`` to a server on
   Redis with ONE ``inferstack worker`` (``--concurrency K``), timed from the
   first submission to the last completion (and the submission rate alone);
   (c) the same on the in-process queue (``serve`` alone, ``--job-workers K``).
2. **CNN (ResNet-18-shaped), cache**: sequential batch-1 binary requests:
   model latency (no cache), Redis cache hits, local cache hits, Redis misses
   (model + store).

Everything runs here: its own ``redis-server`` on a free port, servers and a
worker as subprocesses, all stopped at the end. Results are printed and
written to ``benchmarks/results/bench_async.json``::

    .venv/bin/python benchmarks/bench_async.py                 # ~2 min
    .venv/bin/python benchmarks/bench_async.py --jobs 500 --cache-requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn

PREFIX = "bench:jobs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Proc:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def wait_http(url: str, proc: Proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.log_path} exited:\n{proc.log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def serve(repository: Path, work: Path, name: str, *extra: str) -> tuple[Proc, str, str]:
    http, metrics = free_port(), free_port()
    proc = Proc([sys.executable, "-m", "inferstack", "serve", "--model-repository", str(repository),
                 "--host", "127.0.0.1", "--http-port", str(http), "--metrics-port", str(metrics),
                 "--no-allow-grpc", "--log-level", "warning", *extra], work / f"{name}.log")
    url = f"http://127.0.0.1:{http}"
    wait_http(url + "/v2/health/ready", proc)
    return proc, url, f"http://127.0.0.1:{metrics}/metrics"


def mlp_body(i: int) -> bytes:
    x = np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32",
                                     "data": x.ravel().tolist()}]})


async def closed_loop(url: str, bodies: list[bytes], clients: int, expect: int) -> tuple[float, list[bytes]]:
    """Send every body once with ``clients`` concurrent connections; returns (seconds, responses)."""
    responses: list[bytes] = [b""] * len(bodies)
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(bodies):
            i = next_index
            next_index += 1
            response = await http.post(url, content=bodies[i])
            if response.status_code != expect:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
            responses[i] = response.content

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, responses


def jobs_finished(metrics_url: str, queue: str) -> int:
    text = httpx.get(metrics_url, timeout=10).text
    total = 0
    for outcome in ("succeeded", "failed"):
        needle = f'inferstack_jobs_total{{outcome="{outcome}",queue="{queue}"}} '
        for line in text.splitlines():
            if line.startswith(needle):
                total += int(float(line[len(needle):]))
    return total


def run_async(url: str, metrics_url: str, queue: str, bodies: list[bytes], clients: int,
              sync_outputs: list[bytes]) -> dict:
    before = jobs_finished(metrics_url, queue)
    started = time.perf_counter()
    submit_seconds, responses = asyncio.run(closed_loop(url + "/v2/models/mlp/infer/async", bodies, clients, 202))
    while jobs_finished(metrics_url, queue) - before < len(bodies):
        if time.perf_counter() - started > 600:
            raise TimeoutError("jobs did not finish")
        time.sleep(0.02)
    total = time.perf_counter() - started
    # Correctness: a sample of results equals the synchronous answers.
    for i in range(0, len(bodies), max(1, len(bodies) // 20)):
        job = httpx.get(f"{url}/v2/jobs/{orjson.loads(responses[i])['id']}", timeout=10).json()
        assert job["status"] == "succeeded", job
        got = np.asarray(job["result"]["outputs"][0]["data"], np.float32)
        want = np.asarray(orjson.loads(sync_outputs[i])["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    return {"jobs_per_s": len(bodies) / total, "submit_per_s": len(bodies) / submit_seconds, "seconds": total}


def binary_cnn(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]})
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def latencies(url: str, model: str, inputs: list[np.ndarray]) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as http:
        for x in inputs:
            body, headers = binary_cnn(x)
            started = time.perf_counter()
            response = http.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
            out.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(response.text)
    return out


def summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"p50_ms": statistics.median(ordered), "mean_ms": statistics.fmean(ordered),
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))], "n": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="Requests/jobs per MLP measurement.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent HTTP clients.")
    parser.add_argument("--worker-concurrency", type=int, default=8, help="Jobs the one worker runs at once.")
    parser.add_argument("--cache-requests", type=int, default=40, help="Requests per CNN latency measurement.")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_async.json")
    args = parser.parse_args(argv)
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-async-"))
    procs: list[Proc] = []
    results: dict = {"jobs": args.jobs, "clients": args.clients, "worker_concurrency": args.worker_concurrency,
                     "cpus": os.cpu_count()}
    try:
        mlp_repo, cnn_repo = work / "mlp-repo", work / "cnn-repo"
        cnn.write_model(mlp_repo, "mlp")
        cnn.write_model(cnn_repo, "cnn")
        shutil.copytree(cnn_repo / "cnn", cnn_repo / "cnn_cached")
        config = (cnn_repo / "cnn_cached" / "config.pbtxt").read_text().replace('name: "cnn"', 'name: "cnn_cached"')
        (cnn_repo / "cnn_cached" / "config.pbtxt").write_text(config + "response_cache { enable: true }\n")

        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        procs.append(Proc([redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], work / "redis.log"))
        time.sleep(0.5)

        # -- 1. MLP: sync vs async -------------------------------------------------------
        bodies = [mlp_body(i) for i in range(args.jobs)]
        server, url, metrics_url = serve(mlp_repo, work, "server-redis", "--jobs-redis-url", redis_url,
                                         "--jobs-queue", PREFIX)
        procs.append(server)
        worker_metrics = free_port()
        worker = Proc([sys.executable, "-m", "inferstack", "worker", "--redis-url", redis_url, "--jobs-queue", PREFIX,
                       "--model-repository", str(mlp_repo), "--concurrency", str(args.worker_concurrency),
                       "--metrics-port", str(worker_metrics), "--host", "127.0.0.1", "--log-level", "warning"],
                      work / "worker.log")
        procs.append(worker)
        wait_http(f"http://127.0.0.1:{worker_metrics}/metrics", worker)
        asyncio.run(closed_loop(url + "/v2/models/mlp/infer", bodies[:200], args.clients, 200))  # warm up
        log(f"MLP sync: {args.jobs} requests, {args.clients} clients")
        seconds, sync_outputs = asyncio.run(closed_loop(url + "/v2/models/mlp/infer", bodies, args.clients, 200))
        results["mlp_sync_req_per_s"] = args.jobs / seconds
        log(f"MLP async via Redis, one worker (--concurrency {args.worker_concurrency})")
        results["mlp_async_redis"] = run_async(url, metrics_url, PREFIX, bodies, args.clients, sync_outputs)
        server.stop()
        worker.stop()
        server, url, metrics_url = serve(mlp_repo, work, "server-inprocess", "--job-workers",
                                         str(args.worker_concurrency))
        procs.append(server)
        asyncio.run(closed_loop(url + "/v2/models/mlp/infer/async", bodies[:200], args.clients, 202))  # warm up
        time.sleep(1)
        log("MLP async, in-process queue")
        results["mlp_async_inprocess"] = run_async(url, metrics_url, "in-process", bodies, args.clients,
                                                   sync_outputs)
        server.stop()

        # -- 2. CNN: cache hit vs model ----------------------------------------------------
        rng = np.random.default_rng(0)
        n = args.cache_requests
        distinct = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(n)]
        for kind, spec in (("redis", f"redis,url={redis_url},ttl=600"), ("local", "local,size=67108864")):
            server, url, _ = serve(cnn_repo, work, f"server-cnn-{kind}", "--cache-config", spec)
            procs.append(server)
            latencies(url, "cnn", distinct[:5])  # warm up
            if kind == "redis":
                log(f"CNN model latency ({n} sequential requests)")
                results["cnn_model"] = summary(latencies(url, "cnn", distinct))
                log("CNN Redis cache misses (model + store)")
                results["cnn_redis_miss"] = summary(latencies(url, "cnn_cached", distinct))
            log(f"CNN {kind} cache hits")
            latencies(url, "cnn_cached", distinct[:1])
            results[f"cnn_{kind}_hit"] = summary(latencies(url, "cnn_cached", [distinct[0]] * n))
            stats = httpx.get(f"{url}/v2/models/cnn_cached/stats").json()["model_stats"][0]["inference_stats"]
            results[f"cnn_{kind}_hit"]["server_hits"] = stats["cache_hit"]["count"]
            server.stop()
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)

    r = results
    print()
    print(f"MLP, {r['jobs']} batch-1 requests, {r['clients']} clients, {r['cpus']} CPUs")
    print(f"  sync /infer                         {r['mlp_sync_req_per_s']:8.0f} req/s")
    for key, label in (("mlp_async_redis", "async, Redis + 1 worker"), ("mlp_async_inprocess", "async, in-process")):
        a = r[key]
        print(f"  {label:<34}  {a['jobs_per_s']:8.0f} jobs/s  ({a['jobs_per_s'] / r['mlp_sync_req_per_s']:.2f}x sync;"
              f" submissions alone {a['submit_per_s']:.0f}/s)")
    print(f"CNN batch 1, {args.cache_requests} sequential requests (p50 / mean ms)")
    for key, label in (("cnn_model", "model (no cache)"), ("cnn_redis_miss", "Redis miss (model + store)"),
                       ("cnn_redis_hit", "Redis cache hit"), ("cnn_local_hit", "local cache hit")):
        s = r[key]
        ratio = r["cnn_model"]["p50_ms"] / s["p50_ms"]
        print(f"  {label:<34}  {s['p50_ms']:7.2f} / {s['mean_ms']:7.2f}   ({ratio:.1f}x faster than the model)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
