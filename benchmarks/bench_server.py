#!/usr/bin/env python
"""End-to-end throughput/latency benchmark of ``inferstack serve`` against raw onnxruntime.

One run:

1. builds a model repository (``cnn``: random-weight ResNet-18, ``mlp``: tiny
   2-layer MLP; see ``benchmarks/cnn.py``) in a temporary directory or ``--work-dir``;
2. measures the *ceiling*: in-process onnxruntime (default session options,
   CPUExecutionProvider) samples/s for a range of batch sizes, best = ceiling;
3. starts ``<python> -m inferstack serve`` on free ports, waits for
   ``/v2/health/ready``, checks one binary and one JSON inference per model against
   onnxruntime's output;
4. drives it with closed-loop concurrent clients (asyncio + uvloop, persistent
   keep-alive connections, pre-encoded binary-tensor request bodies), per level:
   throughput, p50/p99 latency, ratio to the ceiling, server and client CPU time per
   request (from /proc), machine CPU busy %, and the average server batch size
   (``/v2/models/{m}/stats`` inference_count / execution_count delta);
5. prints tables (rich) and optionally writes ``--json``.

The server is always terminated (SIGTERM, then SIGKILL) before exiting.

Example::

    .venv/bin/python benchmarks/bench_server.py --duration 10 --json benchmarks/results/run.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

from inferstack.perf import RawConnection, build_request

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn as model_builder  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A level during which other processes used more CPU than this is flagged as noisy.
NOISY_OTHER_CORES = 0.25

try:
    from rich.console import Console
    from rich.table import Table

    # Wide tables when piped to a file/log (rich would otherwise wrap at 80 columns).
    _console = Console() if sys.stdout.isatty() else Console(width=200)
except ImportError:  # pragma: no cover - rich is a project dependency
    _console = None


def log(msg: str) -> None:
    if _console is not None:
        _console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)
    else:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# --------------------------------------------------------------------------------------
# CPU accounting from /proc
# --------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime seconds) of one process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # skip "pid (comm) "
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ppid, ticks / CLK_TCK


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user+sys, incl. reaped children) of ``root`` and its live descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def other_cores(c0: float, m0: tuple[float, float], t0: float) -> float:
    """Average cores used by everything but this process since (self_cpu, machine_cpu, perf_counter) = c0, m0, t0."""
    m1, el = machine_cpu(), time.perf_counter() - t0
    return max(0.0, (m1[0] - m0[0]) / CLK_TCK / el - (self_cpu() - c0) / el)


def wait_quiet(max_wait: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` cores over ``window`` s.

    Returns the other-process load of the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
        time.sleep(window)
        other = other_cores(c0, m0, t0)
        if other < threshold or time.monotonic() >= deadline:
            return other


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # exclude guest columns (already counted in user)
    return total - idle, total


# --------------------------------------------------------------------------------------
# Raw onnxruntime ceiling
# --------------------------------------------------------------------------------------


def measure_ort(path: Path, in_dims: tuple[int, ...], batch_sizes: list[int], seconds: float,
                warmup_iters: int, min_iters: int, repeats: int = 1
                ) -> tuple[dict[int, float], dict[int, list[float]], dict[int, float]]:
    """Samples/s of a default-options CPU InferenceSession per batch size.

    Batch sizes are measured round-robin ``repeats`` times (so slow drifts of a noisy
    machine hit all of them alike); the value per batch size is the median.
    Returns (median samples/s per batch size, all samples/s per batch size,
    median CPU ms per sample per batch size -- less sensitive to other load than samples/s).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
    cpu_ms: dict[int, list[float]] = {b: [] for b in batch_sizes}
    try:
        feeds = {b: {"INPUT0": rng.standard_normal((b, *in_dims), dtype=np.float32)} for b in batch_sizes}
        for _ in range(max(1, repeats)):
            for b in batch_sizes:
                feed = feeds[b]
                for _ in range(warmup_iters):
                    sess.run(["OUTPUT0"], feed)
                n, t0, c0 = 0, time.perf_counter(), self_cpu()
                while True:
                    sess.run(["OUTPUT0"], feed)
                    n += 1
                    el = time.perf_counter() - t0
                    if (el >= seconds and n >= min_iters) or el >= 4 * seconds:
                        break
                samples[b].append(n * b / el)
                cpu_ms[b].append(1e3 * (self_cpu() - c0) / (n * b))
    finally:
        del sess
        gc.collect()
    return ({b: float(np.median(v)) for b, v in samples.items()}, samples,
            {b: float(np.median(v)) for b, v in cpu_ms.items()})


def nearest_batch(avg: float, batches: list[int]) -> int:
    """Measured batch size closest to ``avg`` on a log scale."""
    return min(batches, key=lambda b: abs(np.log(b) - np.log(max(avg, 1e-9))))


def ort_reference(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        return sess.run(["OUTPUT0"], {"INPUT0": x})[0]
    finally:
        del sess
        gc.collect()


# --------------------------------------------------------------------------------------
# KServe v2 / Triton binary-tensor request encoding and response decoding
# --------------------------------------------------------------------------------------


def encode_binary_infer(x: np.ndarray) -> tuple[bytes, int]:
    """(body, json_header_length) for a binary-data infer request with INPUT0 = x."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    })
    return header + raw, len(header)


def encode_json_infer(x: np.ndarray) -> bytes:
    return orjson.dumps({
        "inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.astype(np.float32).ravel().tolist()}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    })


def decode_infer_response(headers: dict[str, str], body: bytes) -> tuple[dict, np.ndarray | None]:
    """Returns (json header, OUTPUT0 array or None). Raises ValueError on malformed bodies."""
    hlen = headers.get("inference-header-content-length")
    if hlen is None:
        js = orjson.loads(body)
        binary = b""
    else:
        n = int(hlen)
        js = orjson.loads(body[:n])
        binary = body[n:]
    outs = js.get("outputs") or []
    offset = 0
    for o in outs:
        params = o.get("parameters") or {}
        size = params.get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if o.get("name") == "OUTPUT0":
                if o.get("datatype", "FP32") != "FP32" or len(chunk) != size:
                    raise ValueError(f"bad binary output {o} (have {len(chunk)} bytes)")
                return js, np.frombuffer(chunk, dtype="<f4").reshape(o["shape"])
        elif o.get("name") == "OUTPUT0":
            return js, np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
    return js, None


def expected_output_nbytes(headers: dict[str, str], body: bytes) -> int:
    """Fast check used on every load-test response: byte size of the binary OUTPUT0 (or element count * 4)."""
    hlen = headers.get("inference-header-content-length")
    if hlen is None:
        js = orjson.loads(body)
        for o in js.get("outputs") or ():
            if o.get("name") == "OUTPUT0":
                return 4 * len(o.get("data") or ())
        return -1
    n = int(hlen)
    js = orjson.loads(body[:n])
    for o in js.get("outputs") or ():
        if o.get("name") == "OUTPUT0":
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is None:
                return 4 * len(o.get("data") or ())
            # only one output requested, so the binary section is exactly OUTPUT0
            return size if len(body) - n == size else -2
    return -1


# --------------------------------------------------------------------------------------
# HTTP/1.1 clients: RawConnection and build_request come from inferstack.perf
# --------------------------------------------------------------------------------------


class HttpxConnection:
    """Same interface on top of a shared httpx.AsyncClient (for comparison with RawConnection)."""

    def __init__(self, client, url: str, body: bytes, headers: dict[str, str]) -> None:
        self.client, self.url, self.body, self.headers = client, url, body, headers

    async def request(self, _data: bytes) -> tuple[int, dict[str, str], bytes]:
        r = await self.client.post(self.url, content=self.body, headers=self.headers)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv, self.log_path = argv, log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # own session: the group is the server and its children
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"[yellow]server did not exit {grace:.0f}s after SIGTERM; killing[/yellow]")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # stray children in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def wait_ready(server: ServerProcess, base_url: str, timeout: float) -> float:
    import httpx

    t0 = time.monotonic()
    last = "no response"
    with httpx.Client(timeout=2.0) as c:
        while time.monotonic() - t0 < timeout:
            if not server.alive():
                raise RuntimeError(f"server exited with code {server.proc.returncode} before becoming ready")
            try:
                r = c.get(f"{base_url}/v2/health/ready")
                if r.status_code == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout:.0f}s (last: {last})")


# --------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    model: str
    concurrency: int
    batch: int
    duration_s: float
    requests: int
    errors: int
    warmup_errors: int
    throughput_rps: float
    infer_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    server_cpu_ms_per_req: float | None
    client_cpu_ms_per_req: float
    server_cpu_util: float | None  # cores
    client_cpu_util: float  # cores
    machine_busy_pct: float
    other_cores: float  # CPU used by processes other than server and client: noise indicator
    avg_batch_size: float | None = None
    executions: int | None = None
    ceiling: float | None = None
    ratio_to_ceiling: float | None = None
    # raw ORT at the measured batch size nearest the server's average batch: separates
    # "the scheduler forms small batches" from "per-request overhead"
    ort_batch_near_avg: int | None = None
    ratio_to_ort_at_avg_batch: float | None = None
    ratio_to_ceiling_recheck: float | None = None
    round: int = 0
    # raw ORT at the best batch size measured right before and right after this level (mean),
    # in the same process, with the server idle: the fairest side-by-side on a noisy machine
    ceiling_paired: float | None = None
    ratio_paired: float | None = None
    # raw ORT CPU ms per sample at ort_batch_near_avg / server CPU ms per request (1.0 = no overhead)
    cpu_efficiency: float | None = None
    error_samples: list[str] = field(default_factory=list)


async def fetch_stats(host: str, port: int, model: str) -> tuple[int, int] | None:
    conn = RawConnection(host, port, 10.0)
    try:
        status, headers, body = await conn.request(build_request("GET", f"/v2/models/{model}/stats", host, port))
        if status != 200:
            return None
        ms = orjson.loads(body)["model_stats"]
        ms = next((m for m in ms if m.get("name") == model), ms[0])
        return int(ms.get("inference_count", 0)), int(ms.get("execution_count", 0))
    except Exception:
        return None
    finally:
        await conn.close()


#: One client's request: performs a single request, checks the response, and returns None
#: when it is correct, else a short description of what was wrong (exceptions count as errors too).
RequestFn = Callable[[], Awaitable["str | None"]]


async def measure_level(*, model: str, batch: int, calls: Sequence[RequestFn], duration: float, warmup: float,
                        server_pid: int | None, timeout: float, max_errors: int,
                        stats: Callable[[], Awaitable[tuple[int, int] | None]] | None = None) -> LevelResult:
    """Closed loop: one task per entry of ``calls`` sends requests back to back.

    ``warmup`` s unmeasured, then ``duration`` s measured: latency per successful request,
    CPU of this process, of the server's process tree (``server_pid``) and of the machine, and
    (``stats``: cumulative (inference_count, execution_count)) the server's average batch size.
    Protocol-agnostic: ``run_level`` (binary HTTP) and ``bench_compare.py`` (JSON HTTP, gRPC,
    another server) build the ``calls``.
    """
    state = {"recording": False, "stop": False, "errors": 0}
    lat: list[int] = []
    err_samples: list[str] = []
    perf = time.perf_counter_ns

    async def worker(call: RequestFn) -> None:
        while not state["stop"]:
            t0 = perf()
            try:
                problem = await call()
            except Exception as e:  # noqa: BLE001 - reported
                problem = repr(e)
                await asyncio.sleep(0.05)
            ok = problem is None
            if not ok and len(err_samples) < 5:
                err_samples.append(problem)
            t1 = perf()
            if state["recording"]:
                if ok:
                    lat.append(t1 - t0)
                else:
                    state["errors"] += 1
            elif not ok:
                state["errors"] += 1
            if state["errors"] > max_errors:
                state["stop"] = True

    tasks = [asyncio.create_task(worker(c)) for c in calls]
    try:
        await asyncio.sleep(warmup)
        stats0 = await stats() if stats else None
        warmup_errors, state["errors"] = state["errors"], 0
        c0, s0, m0, t0 = self_cpu(), process_tree_cpu(server_pid) if server_pid else None, machine_cpu(), time.perf_counter()
        state["recording"] = True
        end = t0 + duration
        while not state["stop"] and time.perf_counter() < end:
            await asyncio.sleep(min(0.1, max(0.0, end - time.perf_counter())))
        state["recording"] = False
        c1, s1, m1, t1 = self_cpu(), process_tree_cpu(server_pid) if server_pid else None, machine_cpu(), time.perf_counter()
        stats1 = await stats() if stats else None
        state["stop"] = True
        _, pending = await asyncio.wait(tasks, timeout=timeout + 5)
        for t in pending:
            t.cancel()
    finally:
        state["stop"] = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    el = t1 - t0
    n = len(lat)
    arr = np.asarray(lat, dtype=np.float64) / 1e6 if n else np.asarray([np.nan])
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    b = batch
    res = LevelResult(
        model=model, concurrency=len(calls), batch=b, duration_s=round(el, 3), requests=n,
        errors=state["errors"], warmup_errors=warmup_errors,
        throughput_rps=n / el, infer_per_s=n * b / el,
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(np.mean(arr)), max_ms=float(np.max(arr)),
        server_cpu_ms_per_req=(1e3 * (s1 - s0) / n) if (s0 is not None and n) else None,
        client_cpu_ms_per_req=(1e3 * (c1 - c0) / n) if n else float("nan"),
        server_cpu_util=((s1 - s0) / el) if s0 is not None else None,
        client_cpu_util=(c1 - c0) / el,
        machine_busy_pct=100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
        other_cores=max(0.0, (m1[0] - m0[0]) / CLK_TCK / el - (c1 - c0) / el
                        - (((s1 - s0) / el) if s0 is not None else 0.0)),  # +-0.1: jiffy accounting
        error_samples=err_samples,
    )
    if stats0 and stats1:
        di, de = stats1[0] - stats0[0], stats1[1] - stats0[1]
        res.executions = de
        res.avg_batch_size = di / de if de > 0 else None
    return res


async def run_level(*, host: str, port: int, model: str, x: np.ndarray, out_elems: int, concurrency: int,
                    duration: float, warmup: float, client_kind: str, server_pid: int | None,
                    timeout: float, max_errors: int) -> LevelResult:
    """Binary-tensor HTTP requests of ``x`` (``measure_level`` with RawConnection or httpx clients)."""
    body, hlen = encode_binary_infer(x)
    path = f"/v2/models/{model}/infer"
    hdrs = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)}
    data = build_request("POST", path, host, port, body, hdrs)
    want = 4 * out_elems

    httpx_client = None
    if client_kind == "httpx":
        import httpx

        httpx_client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}", timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        conns = [HttpxConnection(httpx_client, path, body, hdrs) for _ in range(concurrency)]
    else:
        conns = [RawConnection(host, port, timeout) for _ in range(concurrency)]
    try:
        return await measure_level(model=model, batch=int(x.shape[0]),
                                   calls=[http_call(c, data, want) for c in conns], duration=duration,
                                   warmup=warmup, server_pid=server_pid, timeout=timeout, max_errors=max_errors,
                                   stats=lambda: fetch_stats(host, port, model))
    finally:
        for c in conns:
            await c.close()
        if httpx_client is not None:
            await httpx_client.aclose()


def http_call(conn, data: bytes, want_nbytes: int) -> RequestFn:
    """A RequestFn sending pre-encoded ``data`` on ``conn``; OK = HTTP 200 with ``want_nbytes`` of OUTPUT0
    (binary, or JSON ``data`` elements * 4)."""

    async def call() -> str | None:
        status, headers, rbody = await conn.request(data)
        if status == 200 and expected_output_nbytes(headers, rbody) == want_nbytes:
            return None
        return f"HTTP {status}: {rbody[:300]!r}"

    return call


async def validate_model(host: str, port: int, model: str, x: np.ndarray, ref: np.ndarray,
                         kinds: Sequence[str] = ("binary", "json")) -> list[str]:
    """One binary and/or one JSON request; compare OUTPUT0 with onnxruntime. Returns a list of problems."""
    problems = []
    path = f"/v2/models/{model}/infer"
    body, hlen = encode_binary_infer(x)
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    cases = [
        ("binary", build_request("POST", path, host, port, body,
                                 {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)})),
        ("json", build_request("POST", path, host, port, encode_json_infer(x), {"Content-Type": "application/json"})),
    ]
    cases = [(kind, req) for kind, req in cases if kind in kinds]
    conn = RawConnection(host, port, 60.0)
    try:
        for kind, req in cases:
            try:
                status, headers, rbody = await conn.request(req)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{model} {kind}: request failed: {e!r}")
                continue
            if status != 200:
                problems.append(f"{model} {kind}: HTTP {status}: {rbody[:500]!r}")
                continue
            try:
                _, y = decode_infer_response(headers, rbody)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{model} {kind}: undecodable response ({e!r}): headers={headers} body={rbody[:300]!r}")
                continue
            if y is None:
                problems.append(f"{model} {kind}: no OUTPUT0 in response: {rbody[:300]!r}")
            elif y.shape != ref.shape:
                problems.append(f"{model} {kind}: OUTPUT0 shape {y.shape}, expected {ref.shape}")
            elif not np.allclose(y, ref, rtol=1e-3, atol=tol):
                problems.append(f"{model} {kind}: OUTPUT0 differs from onnxruntime (max abs diff {np.abs(y - ref).max():.3g})")
    finally:
        await conn.close()
    return problems


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def print_ceiling(ceilings: dict[str, dict[int, float]], cpu: dict[str, dict[int, float]]) -> None:
    rows = []
    for m, d in ceilings.items():
        best = max(d, key=d.get)
        for b, v in d.items():
            rows.append((m, str(b), f"{v:,.1f}", f"{cpu[m][b]:.4g}", "best" if b == best else ""))
    if _console is None:
        for r in rows:
            print(*r)
        return
    t = Table(title="raw onnxruntime (in-process, default session options)")
    for c in ("model", "batch", "samples/s", "CPU ms/sample", ""):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    _console.print(t)


def print_results(results: list[LevelResult]) -> None:
    cols = ["model", "conc", "req/s", "infer/s", "p50 ms", "p99 ms", "ratio", "ratio paired", "avg batch",
            "ratio@avg b", "srv CPU ms/req", "CPU eff", "cli CPU ms/req", "srv cores", "cli cores", "other cores",
            "machine busy", "errors"]
    multi = any(r.round for r in results)
    rows = [[r.model, f"{r.concurrency}" + (f" r{r.round + 1}" if multi else ""), f"{r.throughput_rps:,.1f}",
             f"{r.infer_per_s:,.1f}", _f(r.p50_ms, "{:.2f}"),
             _f(r.p99_ms, "{:.2f}"), _f(r.ratio_to_ceiling, "{:.3f}"), _f(r.ratio_paired, "{:.3f}"),
             _f(r.avg_batch_size, "{:.2f}"),
             _f(r.ratio_to_ort_at_avg_batch, "{:.3f}"),
             _f(r.server_cpu_ms_per_req, "{:.3f}"), _f(r.cpu_efficiency, "{:.2f}"),
             _f(r.client_cpu_ms_per_req, "{:.3f}"), _f(r.server_cpu_util, "{:.2f}"),
             _f(r.client_cpu_util, "{:.2f}"), _f(r.other_cores, "{:.2f}"), f"{r.machine_busy_pct:.0f}%", str(r.errors)]
            for r in results]
    for r, row in zip(results, rows):
        if r.other_cores > NOISY_OTHER_CORES and _console is not None:
            row[cols.index("other cores")] = f"[yellow]{row[cols.index('other cores')]}[/yellow]"
    if _console is None:
        print(*cols, sep="\t")
        for r in rows:
            print(*r, sep="\t")
        return
    t = Table(title="inferstack serve, binary HTTP, closed loop")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    _console.print(t)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mlp", help="comma-separated subset of cnn,mlp (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default: %(default)s)")
    ap.add_argument("--concurrency", type=_int_list, default=None,
                    help="concurrency levels for every model (overrides --cnn/--mlp-concurrency), e.g. 1,8,32")
    ap.add_argument("--cnn-concurrency", type=_int_list, default=[16], help="default: 16")
    ap.add_argument("--mlp-concurrency", type=_int_list, default=[1, 8, 32], help="default: 1,8,32")
    ap.add_argument("--cnn-max-batch-size", type=int, default=16)
    ap.add_argument("--mlp-max-batch-size", type=int, default=64)
    ap.add_argument("--cnn-ort-batches", type=_int_list, default=[1, 2, 4, 8, 16])
    ap.add_argument("--mlp-ort-batches", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--ort-seconds", type=float, default=3.0, help="timed seconds per batch size for the ceiling")
    ap.add_argument("--ort-repeats", type=int, default=2,
                    help="round-robin passes over the batch sizes; median per batch size (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every model's concurrency levels this many times (default: %(default)s)")
    ap.add_argument("--no-paired", action="store_true",
                    help="don't measure raw ORT (best batch) right before/after each CNN level")
    ap.add_argument("--skip-ceiling-recheck", action="store_true",
                    help="don't re-measure the CNN ceiling after the server run (noise check)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to SECONDS for other processes to go idle (shared machines)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="raw asyncio keep-alive client (default) or httpx.AsyncClient")
    ap.add_argument("--work-dir", type=Path, default=None, help="model repository / logs here (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the server (default: this one)")
    ap.add_argument("--server-module", default="inferstack", help="runs `<python> -m MODULE serve ...`")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for `serve` (repeatable)")
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--max-errors", type=int, default=100, help="abort a level after this many failed requests")
    ap.add_argument("--no-validate", action="store_true", help="skip the output check against onnxruntime")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in model_builder.MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(model_builder.MODELS)}")
    conc = {"cnn": args.concurrency or args.cnn_concurrency, "mlp": args.concurrency or args.mlp_concurrency}
    mbs = {"cnn": args.cnn_max_batch_size, "mlp": args.mlp_max_batch_size}
    ort_batches = {"cnn": [b for b in args.cnn_ort_batches if b <= mbs["cnn"]] or [1],
                   "mlp": [b for b in args.mlp_ort_batches if b <= mbs["mlp"]] or [1]}

    run_async = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run_async = uvloop.run
        except (ImportError, AttributeError):
            pass

    tmp = None
    if args.work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="inferstack-bench-"))
        work = tmp
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    repo = work / "models"
    if repo.exists():
        shutil.rmtree(repo)  # only the models/ subdir we generate
    report: dict = {
        "host": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    server: ServerProcess | None = None
    rc = 0
    try:
        # 1. models --------------------------------------------------------------------
        import onnxruntime as ort

        report["host"]["onnxruntime"] = ort.__version__
        paths, inputs, refs, out_elems = {}, {}, {}, {}
        for m in models:
            t = time.perf_counter()
            paths[m] = model_builder.write_model(repo, m, mbs[m])
            _, in_dims, out_dims, _ = model_builder.MODELS[m]
            model_builder.check_runs(paths[m], (2, *in_dims), (2, *out_dims))
            inputs[m] = np.random.default_rng(123).standard_normal((1, *in_dims), dtype=np.float32)
            refs[m] = ort_reference(paths[m], inputs[m])
            out_elems[m] = int(np.prod(out_dims))
            log(f"built {m}: {paths[m]} ({paths[m].stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")

        # 2. ceiling -------------------------------------------------------------------
        if args.wait_quiet > 0:
            log(f"waiting up to {args.wait_quiet:.0f}s for other processes to leave the CPUs idle")
            other = wait_quiet(args.wait_quiet)
            report["other_cores_at_start"] = other
            log(("machine quiet" if other < 0.15 else "[yellow]machine still busy[/yellow]")
                + f": other processes use {other:.2f} cores")
        ceilings: dict[str, dict[int, float]] = {}
        ceiling_cpu: dict[str, dict[int, float]] = {}
        for m in models:
            secs = args.ort_seconds if m == "cnn" else max(0.5, args.ort_seconds / 3)
            log(f"measuring raw onnxruntime for {m}, batch sizes {ort_batches[m]} ({secs:.1f}s each)")
            _, in_dims, _, _ = model_builder.MODELS[m]
            c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
            ceilings[m], samples, ceiling_cpu[m] = measure_ort(paths[m], in_dims, ort_batches[m], secs,
                                               warmup_iters=3 if m == "cnn" else 50, min_iters=5,
                                               repeats=args.ort_repeats)
            other = other_cores(c0, m0, t0)
            report.setdefault("ceiling_other_cores", {})[m] = other
            if other > NOISY_OTHER_CORES:
                log(f"[yellow]other processes used {other:.2f} cores while measuring the {m} ceiling: "
                    "the machine is busy, numbers are noisy[/yellow]")
            report.setdefault("ceiling_samples", {})[m] = {str(b): v for b, v in samples.items()}
        report["ceiling"] = {m: {str(b): v for b, v in d.items()} for m, d in ceilings.items()}
        report["ceiling_cpu_ms_per_sample"] = {m: {str(b): v for b, v in d.items()} for m, d in ceiling_cpu.items()}
        print_ceiling(ceilings, ceiling_cpu)

        # 3. server --------------------------------------------------------------------
        http_port, metrics_port, grpc_port = free_ports(3)
        argv_srv = [args.python, "-m", args.server_module, "serve", "--model-repository", str(repo),
                    "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--host", "127.0.0.1"]
        try:
            help_text = subprocess.run([args.python, "-m", args.server_module, "serve", "--help"], capture_output=True,
                                       text=True, timeout=60, env=dict(os.environ, COLUMNS="300", TERM="dumb")).stdout
        except (subprocess.TimeoutExpired, OSError):
            help_text = ""
        if "--grpc-port" in help_text and not any(a.startswith("--grpc-port") for a in args.server_arg):
            argv_srv += ["--grpc-port", str(grpc_port)]  # avoid clashing on the default 8001
        argv_srv += args.server_arg
        server = ServerProcess(argv_srv, work / "server.log")
        log(f"starting server: {' '.join(argv_srv)}")
        server.start()
        try:
            ready_s = wait_ready(server, f"http://127.0.0.1:{http_port}", args.startup_timeout)
        except Exception as e:
            log(f"[red]server failed to start: {e}[/red]\n--- server log tail ({server.log_path}) ---\n{server.log_tail()}")
            report["error"] = f"server failed to start: {e}"
            report["server_log_tail"] = server.log_tail()
            rc = 2
            return rc
        log(f"server ready after {ready_s:.1f}s (pid {server.pid}, log {server.log_path})")
        report["server"] = {"argv": argv_srv, "ready_s": ready_s}

        # 4. load ----------------------------------------------------------------------
        async def drive() -> list[LevelResult]:
            out: list[LevelResult] = []
            for m in models:
                if not args.no_validate:
                    problems = await validate_model("127.0.0.1", http_port, m, inputs[m], refs[m])
                    for p in problems:
                        log(f"[red]validation: {p}[/red]")
                    report.setdefault("validation_problems", []).extend(problems)
                    if not problems:
                        log(f"{m}: binary and JSON responses match onnxruntime")
                best = max(ceilings[m].values())
                best_b = max(ceilings[m], key=ceilings[m].get)
                paired = m == "cnn" and not args.no_paired
                _, in_dims, _, _ = model_builder.MODELS[m]

                def ort_now() -> float:  # blocks the loop, but no load is running
                    return measure_ort(paths[m], in_dims, [best_b], args.ort_seconds, 3, 5)[0][best_b]

                levels = [(rnd, c) for rnd in range(args.rounds) for c in conc[m]]
                mine: list[LevelResult] = []
                pre: list[float] = []
                for rnd, c in levels:
                    if not server.alive():
                        raise RuntimeError(f"server died (exit code {server.proc.returncode})")
                    if args.wait_quiet > 0:  # no load is running here, blocking the loop is harmless
                        other = wait_quiet(args.wait_quiet)
                        if other >= 0.15:
                            log(f"[yellow]machine still busy: other processes use {other:.2f} cores[/yellow]")
                    if paired:
                        pre.append(ort_now())
                        log(f"{m}: raw onnxruntime now, batch {best_b}: {pre[-1]:,.1f}/s")
                    log(f"{m}: concurrency {c}, {args.warmup:.0f}s warmup + {args.duration:.0f}s"
                        + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""))
                    r = await run_level(host="127.0.0.1", port=http_port, model=m, x=inputs[m],
                                        out_elems=out_elems[m], concurrency=c, duration=args.duration,
                                        warmup=args.warmup, client_kind=args.client, server_pid=server.pid,
                                        timeout=args.request_timeout, max_errors=args.max_errors)
                    r.round = rnd
                    r.ceiling = best
                    r.ratio_to_ceiling = r.infer_per_s / best
                    if r.avg_batch_size:
                        nb = nearest_batch(r.avg_batch_size, list(ceilings[m]))
                        r.ort_batch_near_avg = nb
                        r.ratio_to_ort_at_avg_batch = r.infer_per_s / ceilings[m][nb]
                        if r.server_cpu_ms_per_req:
                            r.cpu_efficiency = ceiling_cpu[m][nb] * r.batch / r.server_cpu_ms_per_req
                    out.append(r)
                    mine.append(r)
                    log(f"  {r.throughput_rps:,.1f} req/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
                        f"ratio {r.ratio_to_ceiling:.3f}  avg batch {_f(r.avg_batch_size, '{:.2f}')}  errors {r.errors}")
                    if r.other_cores > NOISY_OTHER_CORES:
                        log(f"  [yellow]other processes used {r.other_cores:.2f} cores during this level: "
                            "noisy measurement[/yellow]")
                    for s in r.error_samples:
                        log(f"  [red]error sample: {s}[/red]")
                if paired and mine:
                    pre.append(ort_now())
                    log(f"{m}: raw onnxruntime now, batch {best_b}: {pre[-1]:,.1f}/s")
                    for i, r in enumerate(mine):
                        r.ceiling_paired = (pre[i] + pre[i + 1]) / 2
                        r.ratio_paired = r.infer_per_s / r.ceiling_paired
                    for c in conc[m]:
                        ratios = [r.ratio_paired for r in mine if r.concurrency == c]
                        log(f"{m} concurrency {c}: ratio to raw onnxruntime measured just before/after "
                            f"(batch {best_b}): " + ", ".join(f"{v:.3f}" for v in ratios)
                            + (f"; median {np.median(ratios):.3f}" if len(ratios) > 1 else ""))
            return out

        results = run_async(drive())
        report["results"] = [asdict(r) for r in results]

        server_rc = server.stop()
        report["server"]["exit_code"] = server_rc
        log(f"server stopped (exit code {server_rc})")

        if "cnn" in models and not args.skip_ceiling_recheck:
            best_b = max(ceilings["cnn"], key=ceilings["cnn"].get)
            c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
            again = measure_ort(paths["cnn"], model_builder.CNN_INPUT_SHAPE, [best_b], args.ort_seconds, 3, 5)[0][best_b]
            report["ceiling_recheck"] = {"batch": best_b, "samples_per_s": again, "other_cores": other_cores(c0, m0, t0)}
            log(f"CNN ceiling re-check after the server run: batch {best_b}: {again:,.1f}/s "
                f"(before: {ceilings['cnn'][best_b]:,.1f}/s; other processes: "
                f"{report['ceiling_recheck']['other_cores']:.2f} cores) -- machine noise indicator")
            for r in results:
                if r.model == "cnn":
                    r.ratio_to_ceiling_recheck = r.infer_per_s / again
                    log(f"  cnn conc {r.concurrency}: ratio {r.ratio_to_ceiling:.3f} to the ceiling, "
                        f"{r.ratio_to_ceiling_recheck:.3f} to the re-check")
            report["results"] = [asdict(r) for r in results]

        print_ceiling(ceilings, ceiling_cpu)
        print_results(results)
        if any(r.errors for r in results) or report.get("validation_problems"):
            rc = 1
        return rc
    except KeyboardInterrupt:
        log("[yellow]interrupted[/yellow]")
        rc = 130
        return rc
    except Exception as e:
        log(f"[red]benchmark failed: {e!r}[/red]")
        report["error"] = repr(e)
        if server is not None:
            tail = server.log_tail()
            report["server_log_tail"] = tail
            log(f"--- server log tail ({server.log_path}) ---\n{tail}")
        rc = 1
        return rc
    finally:
        if server is not None:
            server.stop()
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
            log(f"wrote {args.json}")
        if tmp is not None:
            if args.keep or rc not in (0,):
                log(f"work dir kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
