"""Ensemble overhead and the PyTorch backend, side by side on one server in one run.

    python benchmarks/bench_ensemble.py [--requests 400] [--concurrency 8]

Pipelines (all tiny FP32 [1, 4] models, so the numbers are the serving overhead):

* ``add1``: one ONNX model, one request (the floor).
* ``chain``: an ensemble add1 -> add10, one request.
* ``client chain``: the same two models called one after the other by the client (two round trips).
* ``diamond``: an ensemble add1 -> (add10 || add100) -> add_sub, one request (4 steps, 2 concurrent).

Backends on the same MLP shape (64 -> 256 -> 10, batch 1): ONNX Runtime, TorchScript, torch.export.

Each row: sequential latency p50/p99 over ``--requests`` HTTP requests (binary tensors), and
throughput with ``--concurrency`` client threads over 3 s (after a 1 s concurrent warmup). Results also go to
``benchmarks/results/bench_ensemble.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inferstack.testing import onnx_models  # noqa: E402
from tests.support import ServerProcess  # noqa: E402
from tests.test_ensemble import build_repository  # noqa: E402


def add_torch_models(root: Path) -> None:
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    config = """
max_batch_size: 64
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
"""
    no_opt = '\nparameters { key: "DISABLE_OPTIMIZED_EXECUTION" value: { string_value: "true" } }'
    for name, platform, filename in (("mlp_ts", 'platform: "pytorch_libtorch"', "model.pt"),
                                     ("mlp_ts_noopt", 'platform: "pytorch_libtorch"' + no_opt, "model.pt"),
                                     ("mlp_export", 'backend: "pytorch"', "model.pt2")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(platform + config)
        module = MLP().eval()
        path = str(root / name / "1" / filename)
        if filename == "model.pt":
            torch.jit.save(torch.jit.script(module), path)
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.export.save(torch.export.export(module, (torch.zeros(2, 64),), dynamic_shapes=({0: batch},)),
                              path)
    onnx_models.write_model(root, "mlp_onnx", onnx_models.mlp(), """
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
""")


def _input(name: str, array: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def calls(kind: str, url: str):
    """A function doing one logical request of ``kind`` on a client of its own."""
    client = httpclient.InferenceServerClient(url)
    x4 = np.ones((1, 4), np.float32)
    x64 = np.ones((1, 64), np.float32)
    if kind == "client chain":
        def run() -> None:
            t = client.infer("add1", [_input("INPUT0", x4)]).as_numpy("OUTPUT0")
            client.infer("add10", [_input("INPUT0", t)]).as_numpy("OUTPUT0")
        return run, client
    model, name, x = {
        "add1": ("add1", "INPUT0", x4), "chain": ("chain", "IN", x4), "diamond": ("diamond", "IN", x4),
        "mlp onnx": ("mlp_onnx", "INPUT0", x64), "mlp torchscript": ("mlp_ts", "INPUT__0", x64),
        "mlp torchscript noopt": ("mlp_ts_noopt", "INPUT__0", x64),
        "mlp torch.export": ("mlp_export", "INPUT__0", x64),
    }[kind]

    def run() -> None:
        client.infer(model, [_input(name, x)])
    return run, client


def measure(kind: str, url: str, requests: int, concurrency: int) -> dict:
    run, client = calls(kind, url)
    for _ in range(20):
        run()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - started)
    client.close()
    done = 0
    lock = threading.Lock()

    def burst(seconds: float) -> float:
        """``concurrency`` clients for ``seconds``; returns the elapsed time (``done`` counts requests)."""
        stop = time.perf_counter() + seconds

        def worker() -> None:
            nonlocal done
            work, own = calls(kind, url)
            count = 0
            while time.perf_counter() < stop:
                work()
                count += 1
            own.close()
            with lock:
                done += count

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    # Concurrent warmup first: batches of new sizes appear only under concurrency, and
    # TorchScript's profiling executor re-specialises for each new shape.
    burst(1.0)
    done = 0
    elapsed = burst(3.0)
    lat = np.array(latencies) * 1000
    return {"kind": kind, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "throughput_rps": done / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = build_repository(Path(tmp) / "repo")
        add_torch_models(root)
        server = ServerProcess(root, "--no-strict-readiness", "--log-level", "warning",
                               log_path=Path(tmp) / "server.log")
        try:
            url = server.url.removeprefix("http://")
            rows = [measure(kind, url, args.requests, args.concurrency)
                    for kind in ("add1", "chain", "client chain", "diamond",
                                 "mlp onnx", "mlp torchscript", "mlp torchscript noopt", "mlp torch.export")]
        finally:
            server.stop()
    floor = rows[0]["p50_ms"]
    print(f"{'pipeline':<22}{'p50 ms':>9}{'p99 ms':>9}{'x add1 p50':>12}{'req/s @' + str(args.concurrency):>12}")
    for row in rows:
        print(f"{row['kind']:<22}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['p50_ms'] / floor:>12.2f}"
              f"{row['throughput_rps']:>12.0f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ensemble.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
