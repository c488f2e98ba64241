#!/usr/bin/env python
"""How large tensors travel: system shared memory vs binary HTTP vs JSON HTTP (vs gRPC).

One run:

1. writes an identity model (``INPUT0`` FP32 ``[B,3,224,224]`` -> ``OUTPUT0``, the CNN's
   input, ``max_batch_size: 8``, no dynamic batching, one instance) into a temporary
   repository, so moving the tensor dominates the cost;
2. starts ``<python> -m inferstack serve --allow-client-shm`` on free ports (plus
   ``--grpc-port`` when ``serve --help`` lists it);
3. for every transport, batch 1 (602 KB each way) and batch 8 (4.8 MB each way), at
   concurrency 1 and 4: closed-loop clients, each in its own process (spawned, so the
   clients do not share a GIL) with its own NVIDIA ``tritonclient`` connection, run
   ``--warmup`` s unmeasured and ``--duration`` s measured; every answer is checked
   against the input once per client;
4. prints one table: req/s, MB/s (input + output), p50 and p99 latency, server CPU per
   request, and req/s relative to binary HTTP.

What each transport does per request, client side included, as an application would:

- ``shm``: copy the input into the client's input region, infer over HTTP with input and
  output in shared memory (only JSON on the wire), copy the output out of the output region;
- ``binary``: Triton's binary tensor extension (raw bytes after the JSON, both ways);
- ``json``: tensor data as JSON numbers both ways;
- ``grpc``: ``tritonclient.grpc`` with ``raw_input_contents`` / ``raw_output_contents``.

The server is always stopped and every shared memory region is destroyed. Example::

    .venv/bin/python benchmarks/bench_transfer.py --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL = "identity"
DIMS = (3, 224, 224)
CONFIG = """
name: "identity"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
TRANSPORTS = ("shm", "binary", "json", "grpc")


@dataclass
class Cell:
    transport: str
    batch: int
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_ms: float | None = None
    error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.rps * 2 * self.batch * int(np.prod(DIMS)) * 4 / 1e6


# -- the server process (self-contained: bench_server.py's helpers may move) -----------------


def log(message: str) -> None:
    from rich.console import Console

    Console(width=200).print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def process_tree_cpu(root: int) -> float:
    """user+sys CPU seconds of ``root`` and its live descendants (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(v) for v in fields[11:15]) / ticks
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(child for child, ppid in parent.items() if ppid == pid)
    return total


class Server:
    """``inferstack serve`` in its own session; stop() always ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# -- client processes ---------------------------------------------------------------------


def client_worker(transport: str, http_url: str, grpc_url: str, batch: int, start_at: float,
                  duration: float, timeout: float, min_requests: int) -> tuple[list[float], float, str]:
    """One closed-loop client: latencies (s) of the requests it completed in the window, and
    the window's length: ``duration``, or longer if it took that to complete ``min_requests``
    (slow transports, JSON at batch 8, still get a measurement)."""
    x = np.random.default_rng(os.getpid()).standard_normal((batch, *DIMS), dtype=np.float32)
    nbytes = x.nbytes
    cleanup = []
    try:
        if transport == "grpc":
            import tritonclient.grpc as client_mod

            client = client_mod.InferenceServerClient(grpc_url)
            cleanup.append(client.close)
        else:
            import tritonclient.http as client_mod

            client = client_mod.InferenceServerClient(http_url, connection_timeout=timeout, network_timeout=timeout)
            cleanup.append(client.close)
        tensor = client_mod.InferInput("INPUT0", list(x.shape), "FP32")
        output = client_mod.InferRequestedOutput("OUTPUT0", **({} if transport == "grpc" else {"binary_data": transport != "json"}))

        if transport == "shm":
            import tritonclient.utils.shared_memory as shm

            tag = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            regions = {}
            for side in ("in", "out"):
                handle = shm.create_shared_memory_region(f"{tag}_{side}", f"/{tag}_{side}", nbytes)
                cleanup.append(lambda h=handle: shm.destroy_shared_memory_region(h))
                client.register_system_shared_memory(f"{tag}_{side}", f"/{tag}_{side}", nbytes)
                cleanup.append(lambda n=f"{tag}_{side}": client.unregister_system_shared_memory(n))
                regions[side] = handle
            tensor.set_shared_memory(f"{tag}_in", nbytes)
            output.set_shared_memory(f"{tag}_out", nbytes)

            def once() -> np.ndarray:
                shm.set_shared_memory_region(regions["in"], [x])
                client.infer(MODEL, [tensor], outputs=[output])
                return np.array(shm.get_contents_as_numpy(regions["out"], np.float32, list(x.shape)))
        else:
            def once() -> np.ndarray:
                if transport == "grpc":
                    tensor.set_data_from_numpy(x)
                else:
                    tensor.set_data_from_numpy(x, binary_data=transport == "binary")
                return client.infer(MODEL, [tensor], outputs=[output]).as_numpy("OUTPUT0")

        got = once()
        if not np.array_equal(got, x):
            return [], 0.0, f"{transport}: the output differs from the input"
        while time.time() < start_at:  # warm up until every client is ready
            once()
        latencies = []
        end = start_at + duration
        begin = max(start_at, time.time())  # a slow warmup request may overrun start_at
        while True:
            t0 = time.perf_counter()
            once()
            t1 = time.perf_counter()
            now = time.time()
            if now > end and len(latencies) >= min_requests:
                break
            latencies.append(t1 - t0)
        return latencies, max(duration, now - begin), ""
    except Exception as exc:  # reported in the table, not a crash of the whole run
        return [], 0.0, f"{type(exc).__name__}: {exc}"
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception:
                pass


def _start_worker(_: int) -> int:
    """Spawn-time imports happen here, not in the first measured cell."""
    import tritonclient.grpc  # noqa: F401
    import tritonclient.http  # noqa: F401
    import tritonclient.utils.shared_memory  # noqa: F401

    time.sleep(1.0)  # hold this worker so the next one is spawned too
    return os.getpid()


def run_cell(pool: ProcessPoolExecutor, cell: Cell, http_url: str, grpc_url: str, server_pid: int,
             warmup: float, duration: float, timeout: float, min_requests: int) -> None:
    start_at = time.time() + warmup + 3.0  # 3 s for the clients to start (spawned processes)
    futures = [pool.submit(client_worker, cell.transport, http_url, grpc_url, cell.batch, start_at, duration,
                           timeout, min_requests)
               for _ in range(cell.concurrency)]
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = process_tree_cpu(server_pid)
    latencies: list[float] = []
    errors = []
    seconds = duration
    for future in futures:
        lat, elapsed, error = future.result()
        latencies += lat
        seconds = max(seconds, elapsed)
        if error:
            errors.append(error)
    # Clients stop issuing at start_at + duration; the server CPU read here includes their
    # last in-flight request, a small overestimate at low rates.
    cpu1 = process_tree_cpu(server_pid)
    cell.seconds = seconds
    cell.requests = len(latencies)
    cell.error = "; ".join(sorted(set(errors)))
    if latencies:
        ms = sorted(v * 1000 for v in latencies)
        cell.p50_ms = statistics.median(ms)
        cell.p99_ms = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        cell.server_cpu_ms = (cpu1 - cpu0) * 1000 / len(latencies)


# -- report ---------------------------------------------------------------------------------


def print_table(cells: list[Cell]) -> None:
    from rich.console import Console
    from rich.table import Table

    binary = {(c.batch, c.concurrency): c.rps for c in cells if c.transport == "binary"}
    table = Table(title=f"{MODEL} FP32 [B,{','.join(map(str, DIMS))}]: transport cost (client + server)")
    for column in ("transport", "batch", "MB/req (in+out)", "conc", "requests", "req/s", "MB/s",
                   "p50 ms", "p99 ms", "srv CPU ms/req", "req/s vs binary"):
        table.add_column(column, justify="left" if column == "transport" else "right")
    for c in cells:
        if c.error and not c.requests:
            table.add_row(c.transport, str(c.batch), "", str(c.concurrency), "", "", "", "", "", "",
                          f"[red]{c.error[:60]}[/red]")
            continue
        ref = binary.get((c.batch, c.concurrency))
        table.add_row(
            c.transport, str(c.batch), f"{2 * c.batch * np.prod(DIMS) * 4 / 1e6:.1f}", str(c.concurrency),
            str(c.requests), f"{c.rps:.1f}", f"{c.mb_per_s:.0f}", f"{c.p50_ms:.1f}", f"{c.p99_ms:.1f}",
            f"{c.server_cpu_ms:.2f}" if c.server_cpu_ms is not None else "",
            f"{c.rps / ref:.2f}x" if ref else "",
        )
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per cell")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout (s)")
    parser.add_argument("--min-requests", type=int, default=3,
                        help="each client measures at least this many requests, past --duration if need be")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    batches = [int(v) for v in args.batches.split(",")]
    levels = [int(v) for v in args.concurrency.split(",")]
    transports = [t for t in args.transports.split(",") if t]

    from inferstack.testing import onnx_models

    with tempfile.TemporaryDirectory(prefix="bench_transfer_") as work:
        repo = Path(work) / "repository"
        onnx_models.write_model(repo, MODEL, onnx_models.identity("FP32", list(DIMS)), CONFIG)
        http_port, metrics_port, grpc_port = free_ports(3)
        argv_srv = [args.python, "-m", "inferstack", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                    "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--allow-client-shm"]
        help_text = subprocess.run([args.python, "-m", "inferstack", "serve", "--help"], capture_output=True,
                                   text=True, timeout=60, env=dict(os.environ, COLUMNS="300", TERM="dumb")).stdout
        has_grpc = "--grpc-port" in help_text and "--allow-grpc" in help_text
        if has_grpc:
            argv_srv += ["--grpc-port", str(grpc_port)]
        elif "grpc" in transports:
            log("[yellow]this server has no gRPC endpoint (no --allow-grpc in serve --help): skipping grpc[/yellow]")
            transports.remove("grpc")
        if "--allow-client-shm" not in help_text:
            argv_srv.remove("--allow-client-shm")
        log(f"starting server: {' '.join(argv_srv)}")
        server = Server(argv_srv, Path(work) / "server.log")
        cells: list[Cell] = []
        try:
            server.wait_ready(f"http://127.0.0.1:{http_port}", 120.0)
            if "grpc" in transports:
                try:
                    import tritonclient.grpc as grpcclient

                    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as probe:
                        probe.is_server_ready()
                except Exception as exc:
                    log(f"[yellow]gRPC does not answer ({exc}); skipping grpc[/yellow]")
                    transports.remove("grpc")
            cores = os.cpu_count()
            log(f"server ready (pid {server.pid}); {cores} cores; clients are spawned processes")
            context = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=max(levels), mp_context=context) as pool:
                list(pool.map(_start_worker, range(max(levels))))
                for batch in batches:
                    for transport in transports:
                        for concurrency in levels:
                            cell = Cell(transport, batch, concurrency)
                            run_cell(pool, cell, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", server.pid,
                                     args.warmup, args.duration, args.timeout, args.min_requests)
                            log(f"{transport:>6} batch {batch} c={concurrency}: {cell.rps:.1f} req/s, "
                                f"p50 {cell.p50_ms:.1f} ms" + (f"  [red]{cell.error}[/red]" if cell.error else ""))
                            cells.append(cell)
        except Exception as exc:
            log(f"[red]{type(exc).__name__}: {exc}[/red]\n{server.log_tail()}")
            return 2
        finally:
            server.stop()
        print_table(cells)
        failed = [c for c in cells if c.error]
        return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
