#!/usr/bin/env python
"""inferstack vs a naive FastAPI server vs raw onnxruntime, side by side in one run.

One command measures, on this machine and in one run:

1. **raw ORT**: in-process ``onnxruntime`` per batch size, the best one is the ceiling
   (``bench_server.measure_ort``); for the CNN, raw ORT at that batch size is also one entry of
   every block of levels, measured as long as a level (``paired`` ratios);
2. **naive**: ``benchmarks/naive_server.py``, FastAPI + one ORT session per model, no batching,
   KServe v2 JSON in and out, uvicorn (one worker, uvloop, httptools): the reference baseline, in
   its two common forms (two servers): ``naive`` with a ``def`` handler (FastAPI runs it on its
   thread pool) and ``naive_async`` with an ``async def`` handler calling ``session.run`` inline.
   ``vs naive`` compares with the faster of the two at each level;
3. **inferstack** over HTTP/JSON, HTTP/binary tensors and gRPC (one server process);

for the MLP and the ResNet-18-shaped CNN (``cnn.py``) at several concurrencies (closed loop,
one keep-alive connection per client for HTTP, one grpc.aio channel for gRPC; request bodies
encoded once; every response checked: status and OUTPUT0 size). The variants are interleaved
per concurrency level, so each comparison is between levels measured a few seconds apart.

Then:

* **delay** (same inferstack server): what ``max_queue_delay_microseconds`` costs at low load
  (MLP copies with delay 0 / 500 / 2000 µs, concurrency 1 and 8, binary HTTP);
* **rss** (a fresh server, MLP only): resident memory sampled every second over a long run
  (concurrency 8, clients mixed over JSON, binary and gRPC): it should stay flat;
* **memory** (separate servers): server RSS with 0 (empty repository), 1 and 2 CNN instances (instance_group count),
  idle after load and after every instance has run a batch of 16.

Prints tables, the ratios and whether the targets are met; ``--json`` keeps everything.
Docs and last results: ``docs/performance.md``.

    .venv/bin/python benchmarks/bench_compare.py                  # ~8 min
    .venv/bin/python benchmarks/bench_compare.py --quick          # ~2-2.5 min
    .venv/bin/python benchmarks/bench_compare.py --wait-quiet 60 --json benchmarks/results/compare.json

Needs the ``bench`` extra (``pip install -e '.[bench]'``: fastapi, onnx).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402
import cnn as model_builder  # noqa: E402
from bench_server import (  # noqa: E402
    NOISY_OTHER_CORES,
    LevelResult,
    ServerProcess,
    _f,
    encode_binary_infer,
    encode_json_infer,
    fetch_stats,
    free_ports,
    log,
    machine_cpu,
    measure_level,
    measure_ort,
    ort_reference,
    other_cores,
    self_cpu,
    validate_model,
    wait_quiet,
    wait_ready,
)

from inferstack.perf import RawConnection, build_request  # noqa: E402
from inferstack.perf.clients import grpc_infer_request  # noqa: E402
from inferstack.perf.grpc_h2 import GrpcH2Channel  # noqa: E402

VARIANTS = ("naive", "naive_async", "json", "binary", "grpc")
NAIVE = ("naive", "naive_async")
VARIANT_LABEL = {"ort": "raw ORT in-process (best batch)",
                 "naive": "naive FastAPI def, JSON", "naive_async": "naive FastAPI async def, JSON",
                 "json": "inferstack HTTP/JSON", "binary": "inferstack HTTP/binary", "grpc": "inferstack gRPC"}
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
QUIET = 0.15  # other cores below this: quiet


# --------------------------------------------------------------------------------------
# Model repositories
# --------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_variant(repo: Path, name: str, base: str, model_file: Path, max_batch_size: int, *,
                  delay_us: int = 0, count: int = 1) -> None:
    """``repo/name``: the ``base`` model (same file) with another queue delay / instance count."""
    _, in_dims, out_dims, _ = model_builder.MODELS[base]
    text = model_builder.config_pbtxt(name, in_dims, out_dims, max_batch_size)
    batching = "dynamic_batching { }"
    assert batching in text and "count: 1" in text, "cnn.config_pbtxt changed: update write_variant"
    if delay_us:
        text = text.replace(batching, f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}")
    text = text.replace("count: 1", f"count: {count}")
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text)
    _link_or_copy(model_file, repo / name / "1" / "model.onnx")


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(v) for v in f.read().split())
    except OSError:
        pass
    return out


def tree_memory(root: int) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile (MB) summed over ``root`` and its descendants."""
    total = {"rss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}
    keys = {"VmRSS:": "rss_mb", "RssAnon:": "anon_mb", "RssFile:": "file_mb"}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in keys:
                        total[keys[parts[0]]] += int(parts[1]) / 1024  # kB -> MiB
        except OSError:
            continue
        todo.extend(_children(pid))
    return total


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a variant's requests go."""

    host: str
    http_port: int
    grpc_port: int | None
    pid: int
    stats: bool  # the server has Triton's statistics endpoint


class Clients:
    """The request callables of one level (and what must be closed afterwards)."""

    #: gRPC channels (HTTP/2 connections) the clients of a level spread over; 1 is what
    #: `inferstack perf` does. `serve --workers N` balances connections, so it needs more.
    grpc_channels = 1
    #: The gRPC client: `inferstack` (perf's own HTTP/2 client, what `inferstack perf` uses) or `grpcio` (grpc.aio).
    grpc_client = "inferstack"

    def __init__(self) -> None:
        self.conns: list[RawConnection] = []
        self.channels: list = []
        self._grpc_clients = 0

    def http(self, t: Target, model: str, x: np.ndarray, out_elems: int, binary: bool, timeout: float):
        path = f"/v2/models/{model}/infer"
        if binary:
            body, hlen = encode_binary_infer(x)
            data = build_request("POST", path, t.host, t.http_port, body,
                                 {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(hlen)})
        else:
            data = build_request("POST", path, t.host, t.http_port, encode_json_infer(x),
                                 {"Content-Type": "application/json"})
        conn = RawConnection(t.host, t.http_port, timeout)
        self.conns.append(conn)
        return bs.http_call(conn, data, 4 * out_elems)

    def grpc(self, t: Target, model: str, x: np.ndarray, out_elems: int, timeout: float):
        import grpc.aio

        from inferstack._proto import grpc_service_pb2 as pb

        index = self._grpc_clients % self.grpc_channels
        self._grpc_clients += 1
        if index >= len(self.channels):  # by default one channel carries every client, as in `inferstack perf`
            if self.grpc_client == "inferstack":
                self.channels.append(GrpcH2Channel(t.host, t.grpc_port))
            else:
                self.channels.append(grpc.aio.insecure_channel(
                    f"{t.host}:{t.grpc_port}",
                    options=[("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30),
                             ("grpc.use_local_subchannel_pool", 1)]))
        channel = self.channels[index]
        if isinstance(channel, GrpcH2Channel):
            def infer(data: bytes, timeout: float) -> Awaitable[bytes]:
                return channel.unary(GRPC_INFER, data, timeout)
        else:
            infer = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out
        data = grpc_infer_request(model, "", [("INPUT0", "FP32", list(x.shape), x.astype("<f4").tobytes())],
                                  ["OUTPUT0"])
        want = 4 * out_elems
        parse = pb.ModelInferResponse.FromString

        async def call() -> str | None:
            raw = parse(await infer(data, timeout=timeout)).raw_output_contents
            if len(raw) == 1 and len(raw[0]) == want:
                return None
            return f"bad gRPC response: {[len(r) for r in raw]} raw output bytes, want [{want}]"

        return call

    def for_variant(self, variant: str, targets: dict[str, Target], model: str, x: np.ndarray, out_elems: int,
                    timeout: float):
        if variant in NAIVE:
            return self.http(targets[variant], model, x, out_elems, False, timeout)
        if variant == "grpc":
            return self.grpc(targets["inferstack"], model, x, out_elems, timeout)
        return self.http(targets["inferstack"], model, x, out_elems, variant == "binary", timeout)

    async def close(self) -> None:
        for c in self.conns:
            await c.close()
        for ch in self.channels:
            await ch.close()


async def run_clients(*, variants: list[str], targets: dict[str, Target], model: str, x: np.ndarray,
                      out_elems: int, warmup: float, duration: float, timeout: float,
                      max_errors: int) -> LevelResult:
    """One closed-loop level; ``variants[i]`` is client i's protocol (all on one server)."""
    server = variants[0] if variants[0] in NAIVE else "inferstack"
    target = targets[server]
    clients = Clients()
    try:
        calls = [clients.for_variant(v, targets, model, x, out_elems, timeout) for v in variants]
        stats = (lambda: fetch_stats(target.host, target.http_port, model)) if target.stats else None
        return await measure_level(model=model, batch=int(x.shape[0]), calls=calls, duration=duration,
                                   warmup=warmup, server_pid=target.pid, timeout=timeout,
                                   max_errors=max_errors, stats=stats)
    finally:
        await clients.close()


async def check_grpc(t: Target, model: str, x: np.ndarray, ref: np.ndarray) -> list[str]:
    """One gRPC request; OUTPUT0 must match onnxruntime."""
    import grpc.aio

    from inferstack._proto import grpc_service_pb2 as pb

    async with grpc.aio.insecure_channel(f"{t.host}:{t.grpc_port}") as ch:
        try:
            raw = await ch.unary_unary(GRPC_INFER)(
                grpc_infer_request(model, "", [("INPUT0", "FP32", list(x.shape), x.astype("<f4").tobytes())],
                                   ["OUTPUT0"]), timeout=60)
        except Exception as e:  # noqa: BLE001
            return [f"{model} grpc: {e!r}"]
    msg = pb.ModelInferResponse.FromString(raw)
    if len(msg.raw_output_contents) != 1:
        return [f"{model} grpc: {len(msg.raw_output_contents)} raw outputs"]
    y = np.frombuffer(msg.raw_output_contents[0], dtype="<f4")
    if y.size != ref.size:
        return [f"{model} grpc: OUTPUT0 has {y.size} elements, expected {ref.size}"]
    y = y.reshape(ref.shape)
    if not np.allclose(y, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref).max()))):
        return [f"{model} grpc: OUTPUT0 differs from onnxruntime (max abs diff {np.abs(y - ref).max():.3g})"]
    return []


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    part: str  # main | delay
    variant: str  # naive | naive_async | json | binary | grpc
    model: str  # model name as served (mlp_delay500 for the delay sweep)
    concurrency: int
    round: int
    result: LevelResult
    delay_us: int | None = None
    ceiling: float | None = None  # best raw ORT batch, from the start of the run
    ceiling_paired: float | None = None  # CNN: raw ORT (best batch) measured in this block, as long as a level
    vs_ceiling: float | None = None
    vs_paired: float | None = None
    vs_naive: float | None = None  # req/s / the faster naive server's req/s at the same level and round
    vs_json: float | None = None  # req/s / inferstack HTTP/JSON's req/s at the same level and round
    noisy: bool = False
    profile: str | None = None

    @property
    def noisy_flag(self) -> str:
        return "!" if self.noisy else ""


def _median(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else None


def cell(rows: list[Row], part: str, variant: str, model: str, c: int, attr: str) -> float | None:
    """Median over rounds of one attribute (a Row field or a LevelResult field)."""
    vals = []
    for r in rows:
        if r.part == part and r.variant == variant and r.model == model and r.concurrency == c:
            vals.append(getattr(r, attr) if hasattr(r, attr) else getattr(r.result, attr))
    return _median(vals)


def pair_ratio(rows: list[Row], part: str, a: str, b: str, model: str, c: int) -> float | None:
    """Median over rounds of req/s(variant a) / req/s(variant b) at one level."""
    ratios = []
    for r in rows:
        if r.part == part and r.variant == a and r.model == model and r.concurrency == c:
            for o in rows:
                if (o.part == part and o.variant == b and o.model == model and o.concurrency == c
                        and o.round == r.round and o.result.throughput_rps):
                    ratios.append(r.result.throughput_rps / o.result.throughput_rps)
    return _median(ratios)


def print_table(title: str, cols: list[str], rows: list[list[str]], yellow: list[bool] | None = None) -> None:
    console = bs._console
    if console is None:
        print(title)
        print(*cols, sep="\t")
        for r in rows:
            print(*r, sep="\t")
        return
    from rich.table import Table

    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="right")
    for i, r in enumerate(rows):
        t.add_row(*r, style="yellow" if yellow and yellow[i] else None)
    console.print(t)


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _us(ms: float | None) -> str:
    return _f(None if ms is None else 1e3 * ms, "{:,.0f}")


def main_table(rows: list[Row]) -> tuple[list[str], list[list[str]], list[bool]]:
    cols = ["model", "conc", "server / protocol", "req/s", "infer/s", "p50 ms", "p99 ms", "vs naive",
            "vs ceiling", "vs ceiling paired", "avg batch", "srv CPU us/req", "cli CPU us/req", "srv cores",
            "other cores", "errors"]
    out, noisy = [], []
    multi = any(r.round for r in rows)
    for r in rows:
        if r.part != "main":
            continue
        x = r.result
        out.append([r.model, str(r.concurrency) + (f" r{r.round + 1}" if multi else ""),
                    VARIANT_LABEL[r.variant] + (" (profiled)" if r.profile else ""),
                    f"{x.throughput_rps:,.1f}", f"{x.infer_per_s:,.1f}", _f(x.p50_ms, "{:.2f}"), _f(x.p99_ms, "{:.2f}"),
                    _f(r.vs_naive, "{:.2f}x"), _f(r.vs_ceiling, "{:.3f}"), _f(r.vs_paired, "{:.3f}"),
                    _f(x.avg_batch_size, "{:.2f}"), _us(x.server_cpu_ms_per_req), _us(x.client_cpu_ms_per_req),
                    _f(x.server_cpu_util, "{:.2f}"), _f(x.other_cores, "{:.2f}") + r.noisy_flag, str(x.errors)])
        noisy.append(r.noisy)
    return cols, out, noisy


def median_table(rows: list[Row]) -> tuple[list[str], list[list[str]], list[bool]]:
    """The main part with every number the median over rounds (ratios: median of the per-round ratios)."""
    cols = ["model", "conc", "server / protocol", "req/s", "p50 ms", "p99 ms", "vs naive", "vs ceiling",
            "vs ceiling paired", "avg batch", "srv CPU us/req", "cli CPU us/req", "max other cores", "errors"]
    keys: list[tuple[str, int, str]] = []
    for r in rows:
        if r.part == "main" and (r.model, r.concurrency, r.variant) not in keys:
            keys.append((r.model, r.concurrency, r.variant))
    order = ["ort", *VARIANTS]
    keys.sort(key=lambda k: (["mlp", "cnn"].index(k[0]) if k[0] in ("mlp", "cnn") else 9, k[1], order.index(k[2])))
    out, noisy = [], []
    for m, c, v in keys:
        group = [r for r in rows if r.part == "main" and (r.model, r.concurrency, r.variant) == (m, c, v)]
        med = lambda attr, m=m, c=c, v=v: cell(rows, "main", v, m, c, attr)  # noqa: E731
        other = max(r.result.other_cores for r in group)
        out.append([m, str(c), VARIANT_LABEL[v], _f(med("throughput_rps"), "{:,.1f}"), _f(med("p50_ms"), "{:.2f}"),
                    _f(med("p99_ms"), "{:.2f}"), _f(med("vs_naive"), "{:.2f}x"), _f(med("vs_ceiling"), "{:.3f}"),
                    _f(med("vs_paired"), "{:.3f}"), _f(med("avg_batch_size"), "{:.2f}"),
                    _us(med("server_cpu_ms_per_req")), _us(med("client_cpu_ms_per_req")),
                    _f(other, "{:.2f}") + ("!" if other > NOISY_OTHER_CORES else ""),
                    str(sum(r.result.errors for r in group))])
        noisy.append(other > NOISY_OTHER_CORES)
    return cols, out, noisy


def delay_table(rows: list[Row]) -> tuple[list[str], list[list[str]], list[bool]]:
    cols = ["conc", "max_queue_delay us", "req/s", "vs delay 0", "p50 ms", "p99 ms", "avg batch",
            "srv CPU us/req", "other cores", "errors"]
    out, noisy = [], []
    base: dict[tuple[int, int], float] = {}
    for r in rows:
        if r.part == "delay" and r.delay_us == 0:
            base[(r.concurrency, r.round)] = r.result.throughput_rps
    multi = any(r.round for r in rows)
    for r in sorted((r for r in rows if r.part == "delay"), key=lambda r: (r.concurrency, r.round, r.delay_us)):
        x = r.result
        b = base.get((r.concurrency, r.round))
        out.append([str(r.concurrency) + (f" r{r.round + 1}" if multi else ""), str(r.delay_us),
                    f"{x.throughput_rps:,.1f}", _f(x.throughput_rps / b if b else None, "{:.2f}x"),
                    _f(x.p50_ms, "{:.3f}"), _f(x.p99_ms, "{:.3f}"), _f(x.avg_batch_size, "{:.2f}"),
                    _us(x.server_cpu_ms_per_req), _f(x.other_cores, "{:.2f}") + r.noisy_flag, str(x.errors)])
        noisy.append(r.noisy)
    return cols, out, noisy


# --------------------------------------------------------------------------------------
# py-spy
# --------------------------------------------------------------------------------------


#: py-spy attributes time spent in C code to the innermost Python frame: name what that means.
_C_TIME = {
    "Runner.run (asyncio/runners.py)": "(event loop C code: uvloop/libuv, syscalls, C callbacks)",
    "_worker (concurrent/futures/thread.py)": "(instance thread outside Python: queue wait, GIL)",
    "Thread.run (threading.py)": "(C code of a helper thread: gRPC poller)",
}


#: Entry frames (process start, CLI, event loop, thread start): left out of the inclusive lists.
_ENTRY = ("<frozen runpy>", "(typer/", "(inferstack/__main__.py", "(inferstack/cli.py",
          "run_server (inferstack/server.py", "(asyncio/runners.py", "Thread._bootstrap", "Thread.run (threading.py",
          "_worker (concurrent/futures/thread.py")


def summarize_pyspy(raw_file: Path, top: int = 12) -> dict:
    """Per thread, the top functions by self and by inclusive samples from py-spy's ``--format raw``
    (collapsed stacks, recorded with ``--threads``); entry frames are left out of the inclusive list."""
    threads: dict[str, dict] = {}
    total = 0
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        name = "?"
        if frames and frames[0].startswith("thread "):
            name = frames.pop(0).split(": ", 1)[-1]
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f and f.endswith(")") else f for f in frames]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        t = threads.setdefault(name, {"samples": 0, "self": {}, "incl": {}})
        t["samples"] += count
        leaf = _C_TIME.get(frames[-1], frames[-1])
        t["self"][leaf] = t["self"].get(leaf, 0) + count
        for f in set(frames):
            t["incl"][f] = t["incl"].get(f, 0) + count
    out = {"samples": total, "threads": {}}
    for name, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        n = t["samples"]
        incl = [(f, v) for f, v in t["incl"].items() if not any(e in f for e in _ENTRY)]

        def pct(items, n=n) -> list[tuple[str, float]]:
            return [(k, 100.0 * v / max(total, 1)) for k, v in sorted(items, key=lambda kv: -kv[1])[:top]]

        out["threads"][name] = {"pct_of_samples": 100.0 * n / max(total, 1), "self": pct(t["self"].items()),
                                "inclusive": pct(incl)}
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def git_state() -> str:
    """``<commit>`` of the checkout, plus `` (src/ modified)`` when the server's source differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + (" (src/ modified)" if dirty else "")


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="~2 min: shorter levels, MLP at 1,32, CNN at 16, 15 s RSS run (explicit flags still win)")
    ap.add_argument("--parts", default="main,delay,rss,memory",
                    help="comma-separated subset of main,delay,rss,memory (default: %(default)s)")
    ap.add_argument("--models", default="mlp,cnn", help="models for the main part (default: %(default)s)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="default: %(default)s")
    ap.add_argument("--mlp-concurrency", type=_int_list, default=None, help="default: 1,8,32 (quick: 1,32)")
    ap.add_argument("--cnn-concurrency", type=_int_list, default=None, help="default: 1,8,16,32 (quick: 16)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 6, quick 2.5)")
    ap.add_argument("--cnn-duration", type=float, default=None,
                    help="measured seconds per CNN level (default: --duration, at least 5)")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per level (default 2, quick 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the main and delay levels; tables show every round, ratios use the median")
    ap.add_argument("--delays", type=_int_list, default=[0, 500, 2000], help="MLP max_queue_delay_microseconds")
    ap.add_argument("--delay-concurrency", type=_int_list, default=[1, 8])
    ap.add_argument("--delay-variant", choices=["binary", "json", "grpc"], default="binary")
    ap.add_argument("--rss-seconds", type=float, default=None, help="RSS run length (default 60, quick 15)")
    ap.add_argument("--rss-concurrency", type=int, default=8)
    ap.add_argument("--rss-growth-mb", type=float, default=2.0,
                    help="RSS growth (last quarter mean - first quarter mean) above this is reported as growth")
    ap.add_argument("--mem-burst", type=float, default=None,
                    help="seconds of batch-16 CNN requests (2 clients) before the 'after requests' RSS "
                         "(default 4, quick 3)")
    ap.add_argument("--ort-seconds", type=float, default=None,
                    help="raw ORT seconds per batch size (default 1.5, quick 0.7)")
    ap.add_argument("--ort-repeats", type=int, default=None,
                    help="round-robin passes over the batch sizes (default 2, quick 1)")
    ap.add_argument("--no-paired", action="store_true", help="no raw ORT level in each CNN block")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before the ceiling and each level, wait up to SECONDS for other processes to go idle")
    ap.add_argument("--py-spy", default=None, metavar="PATH",
                    help="py-spy binary: profile the inferstack server during the MLP levels at the highest MLP "
                         "concurrency (json, binary, grpc); those levels are marked 'profiled' (py-spy takes CPU)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="model repositories, logs, profiles (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the servers (default: this one)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for `inferstack serve`")
    ap.add_argument("--grpc-client", choices=["inferstack", "grpcio"], default="inferstack",
                    help="gRPC load client: inferstack (perf's own HTTP/2 client, as `inferstack perf`) or grpcio "
                         "(grpc.aio, ~3x the client CPU per call)")
    ap.add_argument("--grpc-channels", type=int, default=1,
                    help="gRPC channels (connections) the clients of a level share; >1 to reach every "
                         "process of `serve --workers N`")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--max-errors", type=int, default=100, help="abort a level after this many failed requests")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown to this file")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"mlp_concurrency": [1, 32] if q else [1, 8, 32], "cnn_concurrency": [16] if q else [1, 8, 16, 32],
                "duration": 2.5 if q else 6.0, "warmup": 1.0 if q else 2.0, "rss_seconds": 15.0 if q else 60.0,
                "mem_burst": 3.0 if q else 4.0, "ort_seconds": 0.7 if q else 1.5, "ort_repeats": 1 if q else 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.cnn_duration is None:
        args.cnn_duration = max(args.duration, 5.0)
    return args


class Run:
    """State of one benchmark run."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.repo = work / "models"
        self.rows: list[Row] = []
        self.report: dict = {
            "host": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                     "load_avg_at_start": os.getloadavg(), "git": git_state()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        self.servers: list[ServerProcess] = []
        self.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
        self.models = [m.strip() for m in args.models.split(",") if m.strip()]
        self.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in self.variants:
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
        self.conc = {"mlp": args.mlp_concurrency, "cnn": args.cnn_concurrency}
        self.mbs = {"cnn": 16, "mlp": 64}
        self.paths: dict[str, Path] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.refs: dict[str, np.ndarray] = {}
        self.out_elems: dict[str, int] = {}
        self.ceilings: dict[str, dict[int, float]] = {}
        self.ceiling_cpu: dict[str, dict[int, float]] = {}

    # -- helpers ----------------------------------------------------------------------

    def quiet(self) -> None:
        if self.args.wait_quiet > 0:
            other = wait_quiet(self.args.wait_quiet, threshold=QUIET, window=1.0)
            if other >= QUIET:
                log(f"[yellow]machine still busy: other processes use {other:.2f} cores[/yellow]")

    def start(self, name: str, argv: list[str], http_port: int) -> ServerProcess:
        srv = ServerProcess(argv, self.work / f"{name}.log")
        log(f"starting {name}: {' '.join(argv)}")
        srv.start()
        self.servers.append(srv)
        try:
            ready = wait_ready(srv, f"http://127.0.0.1:{http_port}", self.args.startup_timeout)
        except Exception as e:
            raise RuntimeError(f"{name} failed to start: {e}\n--- {srv.log_path} ---\n{srv.log_tail()}") from None
        log(f"{name} ready after {ready:.1f}s (pid {srv.pid})")
        return srv

    def inferstack_argv(self, repo: Path, http_port: int, metrics_port: int, grpc_port: int) -> list[str]:
        return [self.args.python, "-m", "inferstack", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                *self.args.server_arg]

    def stop_servers(self) -> None:
        for srv in list(self.servers):
            srv.stop()
            self.servers.remove(srv)

    # -- steps ------------------------------------------------------------------------

    def build(self) -> None:
        import onnxruntime

        self.report["host"]["onnxruntime"] = onnxruntime.__version__
        for m in ("mlp", "cnn"):
            t = time.perf_counter()
            self.paths[m] = model_builder.write_model(self.repo, m, self.mbs[m])
            _, in_dims, out_dims, _ = model_builder.MODELS[m]
            model_builder.check_runs(self.paths[m], (2, *in_dims), (2, *out_dims))
            self.inputs[m] = np.random.default_rng(123).standard_normal((1, *in_dims), dtype=np.float32)
            self.refs[m] = ort_reference(self.paths[m], self.inputs[m])
            self.out_elems[m] = int(np.prod(out_dims))
            log(f"built {m} ({self.paths[m].stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
        for d in self.args.delays:
            if d:
                write_variant(self.repo, f"mlp_delay{d}", "mlp", self.paths["mlp"], self.mbs["mlp"], delay_us=d)

    def measure_ceilings(self) -> None:
        a = self.args
        batches = {"cnn": [1, 2, 4, 8, 16], "mlp": [1, 2, 4, 8, 16, 32, 64]}
        if a.wait_quiet > 0:
            log(f"waiting up to {a.wait_quiet:.0f}s for other processes to leave the CPUs idle")
            other = wait_quiet(a.wait_quiet)
            self.report["other_cores_at_start"] = other
            log(("machine quiet" if other < QUIET else "[yellow]machine still busy[/yellow]")
                + f": other processes use {other:.2f} cores")
        for m in ("mlp", "cnn"):
            secs = a.ort_seconds if m == "cnn" else max(0.3, a.ort_seconds / 3)
            log(f"raw onnxruntime, {m}, batch sizes {batches[m]} ({secs:.1f}s each, {a.ort_repeats} passes)")
            _, in_dims, _, _ = model_builder.MODELS[m]
            c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
            self.ceilings[m], samples, self.ceiling_cpu[m] = measure_ort(
                self.paths[m], in_dims, batches[m], secs, warmup_iters=3 if m == "cnn" else 50, min_iters=5,
                repeats=a.ort_repeats)
            other = other_cores(c0, m0, t0)
            self.report.setdefault("ceiling_other_cores", {})[m] = other
            if other > NOISY_OTHER_CORES:
                log(f"[yellow]other processes used {other:.2f} cores during the {m} ceiling: noisy[/yellow]")
        self.report["ceiling"] = {m: {str(b): v for b, v in d.items()} for m, d in self.ceilings.items()}
        self.report["ceiling_cpu_ms_per_sample"] = {m: {str(b): v for b, v in d.items()}
                                                    for m, d in self.ceiling_cpu.items()}
        bs.print_ceiling(self.ceilings, self.ceiling_cpu)

    def validate(self, targets: dict[str, Target], loop_run) -> None:
        problems: list[str] = []

        async def go() -> None:
            for m in self.models if "main" in self.parts else ["mlp"]:
                for v in NAIVE:
                    if v in targets:
                        problems.extend(await validate_model("127.0.0.1", targets[v].http_port, m,
                                                             self.inputs[m], self.refs[m], kinds=("json",)))
                problems.extend(await validate_model("127.0.0.1", targets["inferstack"].http_port, m,
                                                     self.inputs[m], self.refs[m]))
                problems.extend(await check_grpc(targets["inferstack"], m, self.inputs[m], self.refs[m]))

        loop_run(go())
        self.report["validation_problems"] = problems
        for p in problems:
            log(f"[red]validation: {p}[/red]")
        if problems:
            raise RuntimeError("responses differ from onnxruntime: " + "; ".join(problems))
        log("every server's responses match onnxruntime (inferstack: JSON, binary, gRPC; naive: JSON)")

    async def level(self, targets: dict[str, Target], part: str, variant: str, model: str, base: str, c: int,
                    rnd: int, delay_us: int | None = None, profile: bool = False) -> Row:
        a = self.args
        self.quiet()
        log(f"{part}: {model} {VARIANT_LABEL[variant]} concurrency {c}"
            + (f" round {rnd + 1}" if a.rounds > 1 else "") + (" (py-spy)" if profile else ""))
        spy = None
        prof_file = self.work / f"pyspy-{model}-{variant}-c{c}-r{rnd + 1}.txt"
        if profile:
            spy = subprocess.Popen([a.py_spy, "record", "--pid", str(targets["inferstack"].pid), "--rate", "200",
                                    "--duration", str(max(1, int(a.warmup + a.duration))), "--nonblocking", "--threads",
                                    "--format", "raw", "--output", str(prof_file)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        res = await run_clients(variants=[variant] * c, targets=targets, model=model, x=self.inputs[base],
                                out_elems=self.out_elems[base], warmup=a.warmup,
                                duration=a.cnn_duration if base == "cnn" else a.duration,
                                timeout=a.request_timeout, max_errors=a.max_errors)
        row = Row(part=part, variant=variant, model=model, concurrency=c, round=rnd, result=res, delay_us=delay_us,
                  noisy=res.other_cores > NOISY_OTHER_CORES)
        if spy is not None:
            _, err = await asyncio.to_thread(spy.communicate)
            if spy.returncode == 0 and prof_file.exists():
                row.profile = str(prof_file)
            else:
                log(f"[yellow]py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}[/yellow]")
        log(f"  {res.throughput_rps:,.1f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  "
            f"avg batch {_f(res.avg_batch_size, '{:.2f}')}  srv CPU {_us(res.server_cpu_ms_per_req)} us/req  "
            f"other cores {res.other_cores:.2f}  errors {res.errors}")
        if row.noisy:
            log(f"  [yellow]other processes used {res.other_cores:.2f} cores: noisy level[/yellow]")
        for s in res.error_samples:
            log(f"  [red]error sample: {s}[/red]")
        self.rows.append(row)
        return row

    def ort_level(self, model: str, c: int, rnd: int) -> Row:
        """Raw ORT at the best batch size for as long as a server level: the CNN blocks' paired ceiling."""
        self.quiet()
        best_b = max(self.ceilings[model], key=self.ceilings[model].get)
        _, in_dims, _, _ = model_builder.MODELS[model]
        log(f"main: {model} raw onnxruntime, batch {best_b}, in the concurrency-{c} block")
        c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
        rate, _, cpu = measure_ort(self.paths[model], in_dims, [best_b], self.args.cnn_duration, 3, 5)
        el = time.perf_counter() - t0
        rate, cpu_ms = rate[best_b], cpu[best_b]
        nan = float("nan")
        # One "request" is one sample here, so req/s and CPU per request compare with batch-1 requests.
        res = LevelResult(model=model, concurrency=c, batch=1, duration_s=round(el, 3),
                          requests=int(rate * el), errors=0, warmup_errors=0, throughput_rps=rate,
                          infer_per_s=rate, p50_ms=nan, p90_ms=nan, p99_ms=nan, mean_ms=nan, max_ms=nan,
                          server_cpu_ms_per_req=cpu_ms, client_cpu_ms_per_req=nan,
                          server_cpu_util=rate * cpu_ms / 1e3, client_cpu_util=nan, machine_busy_pct=nan,
                          other_cores=other_cores(c0, m0, t0), avg_batch_size=float(best_b))
        log(f"  {rate:,.1f} samples/s  other cores {res.other_cores:.2f}")
        row = Row(part="main", variant="ort", model=model, concurrency=c, round=rnd, result=res,
                  noisy=res.other_cores > NOISY_OTHER_CORES)
        self.rows.append(row)
        return row

    async def main_part(self, targets: dict[str, Target]) -> None:
        a = self.args
        top_mlp = max(self.conc["mlp"])
        for m in self.models:
            # CNN: raw ORT at the best batch size is one more entry of every block, as long as a level.
            variants = self.variants + (["ort"] if m == "cnn" and not a.no_paired else [])
            for rnd in range(a.rounds):
                for c in self.conc[m]:
                    order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                    block = []
                    for v in order:
                        if v == "ort":
                            block.append(self.ort_level(m, c, rnd))
                            continue
                        prof = bool(a.py_spy) and m == "mlp" and c == top_mlp and v not in NAIVE
                        block.append(await self.level(targets, "main", v, m, m, c, rnd, profile=prof))
                    by = {r.variant: r for r in block}
                    naive_best = max((by[v].result.throughput_rps for v in NAIVE if v in by), default=0.0)
                    best = max(self.ceilings[m].values())
                    for r in block:
                        if naive_best:
                            r.vs_naive = r.result.throughput_rps / naive_best
                        if "json" in by and by["json"].result.throughput_rps:
                            r.vs_json = r.result.throughput_rps / by["json"].result.throughput_rps
                        r.ceiling, r.vs_ceiling = best, r.result.infer_per_s / best
                        if "ort" in by:
                            r.ceiling_paired = by["ort"].result.infer_per_s
                            r.vs_paired = r.result.infer_per_s / r.ceiling_paired

    async def delay_part(self, targets: dict[str, Target]) -> None:
        a = self.args
        for rnd in range(a.rounds):
            for c in a.delay_concurrency:
                for d in a.delays:
                    name = "mlp" if d == 0 else f"mlp_delay{d}"
                    await self.level(targets, "delay", a.delay_variant, name, "mlp", c, rnd, delay_us=d)

    def rss_server(self) -> dict[str, Target]:
        """A fresh inferstack serving only the MLP (nothing left over from other models' loads)."""
        repo = self.work / "rss-repo"
        shutil.rmtree(repo, ignore_errors=True)
        write_variant(repo, "mlp", "mlp", self.paths["mlp"], self.mbs["mlp"])
        hp, mp, gp = free_ports(3)
        srv = self.start("rss", self.inferstack_argv(repo, hp, mp, gp), hp)
        return {"inferstack": Target("127.0.0.1", hp, gp, srv.pid, True)}

    async def rss_part(self, targets: dict[str, Target]) -> None:
        a = self.args
        pid = targets["inferstack"].pid
        mix = [("json", "binary", "grpc")[i % 3] for i in range(a.rss_concurrency)]
        self.quiet()
        log(f"rss: fresh server, mlp only, {a.rss_concurrency} clients ({mix.count('json')} JSON, "
            f"{mix.count('binary')} binary, {mix.count('grpc')} gRPC), {a.rss_seconds:.0f}s, RSS every second")
        samples: list[tuple[float, float]] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, tree_memory(pid)["rss_mb"]))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

        sampler = asyncio.create_task(sample())
        try:
            res = await run_clients(variants=mix, targets=targets, model="mlp", x=self.inputs["mlp"],
                                    out_elems=self.out_elems["mlp"], warmup=a.warmup, duration=a.rss_seconds,
                                    timeout=a.request_timeout, max_errors=a.max_errors)
        finally:
            stop.set()
            await sampler
        measured = [(t, v) for t, v in samples if t >= a.warmup] or samples
        ts, vs = np.array([t for t, _ in measured]), np.array([v for _, v in measured])
        q = max(1, len(vs) // 4)
        growth = float(vs[-q:].mean() - vs[:q].mean())
        slope = float(np.polyfit(ts, vs, 1)[0] * 60) if len(vs) > 2 else 0.0
        self.report["rss_run"] = {
            "clients": mix, "result": asdict(res), "samples": samples, "first_mb": float(vs[0]),
            "last_mb": float(vs[-1]), "min_mb": float(vs.min()), "max_mb": float(vs.max()),
            "growth_mb": growth, "slope_mb_per_min": slope, "flat": growth <= a.rss_growth_mb,
            "requests": res.requests, "errors": res.errors}
        log(f"  {res.throughput_rps:,.1f} req/s over {a.rss_seconds:.0f}s ({res.requests:,} requests, "
            f"{res.errors} errors); RSS {vs[0]:.1f} -> {vs[-1]:.1f} MB (min {vs.min():.1f}, max {vs.max():.1f}); "
            f"last quarter - first quarter {growth:+.2f} MB; slope {slope:+.2f} MB/min"
            + ("" if growth <= a.rss_growth_mb else " [red]GROWS[/red]"))

    def memory_part(self, loop_run) -> None:
        a = self.args
        out = []
        for count in (0, 1, 2):
            repo = self.work / f"mem-repo-{count}"
            shutil.rmtree(repo, ignore_errors=True)
            repo.mkdir(parents=True)
            if count:
                write_variant(repo, "cnn", "cnn", self.paths["cnn"], self.mbs["cnn"], count=count)
            hp, mp, gp = free_ports(3)
            srv = self.start(f"memory-{count}", self.inferstack_argv(repo, hp, mp, gp), hp)
            time.sleep(1.0)
            idle = tree_memory(srv.pid)
            entry = {"instances": count, "idle": idle, "threads": len(os.listdir(f"/proc/{srv.pid}/task"))}
            if count:
                # Two clients sending batch-16 requests: every instance runs the largest batch, so its
                # ONNX Runtime arena reaches the size it keeps from then on.
                targets = {"inferstack": Target("127.0.0.1", hp, gp, srv.pid, True)}
                x16 = np.repeat(self.inputs["cnn"], self.mbs["cnn"], axis=0)
                res = loop_run(run_clients(variants=["binary"] * 2, targets=targets, model="cnn",
                                           x=x16, out_elems=self.out_elems["cnn"] * self.mbs["cnn"], warmup=0.0,
                                           duration=a.mem_burst, timeout=a.request_timeout,
                                           max_errors=a.max_errors))
                entry["after"] = tree_memory(srv.pid)
                entry["burst"] = {"requests": res.requests, "errors": res.errors, "request_batch": self.mbs["cnn"],
                                  "executions": res.executions}
            srv.stop()
            self.servers.remove(srv)
            out.append(entry)
            log(f"memory: {count} CNN instance(s): RSS idle {idle['rss_mb']:.1f} MB"
                + (f", after {entry['burst']['requests']} batch-{self.mbs['cnn']} requests "
                   f"{entry['after']['rss_mb']:.1f} MB" if count else ""))
        self.report["memory"] = out

    # -- report -----------------------------------------------------------------------

    def summary(self) -> list[str]:
        """The ratios and targets, one line each."""
        lines: list[str] = []
        rows = self.rows
        rep: dict = {}
        if "main" in self.parts:
            if "cnn" in self.models:
                for c in [c for c in self.conc["cnn"] if c >= 16]:
                    for v in ("binary", "grpc"):
                        r1 = cell(rows, "main", v, "cnn", c, "vs_ceiling")
                        r2 = cell(rows, "main", v, "cnn", c, "vs_paired")
                        if r1 is None:
                            continue
                        best = max(x for x in (r1, r2) if x is not None)
                        lines.append(f"CNN c={c} {VARIANT_LABEL[v]}: {r1:.3f} of the raw-ORT ceiling"
                                     + (f", {r2:.3f} of raw ORT measured around it" if r2 is not None else "")
                                     + f" (target >= 0.95: {'met' if best >= 0.95 else 'NOT met'})")
                        rep[f"cnn_c{c}_{v}_vs_ceiling"] = r1
                        rep[f"cnn_c{c}_{v}_vs_paired"] = r2
            for m in [m for m in ("mlp", "cnn") if m in self.models]:
                for c in self.conc[m]:
                    top = c == max(self.conc[m])
                    for v in ("json", "binary", "grpc"):
                        best = cell(rows, "main", v, m, c, "vs_naive")
                        if best is None:
                            continue
                        each = {n: pair_ratio(rows, "main", v, n, m, c) for n in NAIVE}
                        line = (f"{m.upper()} c={c}: {VARIANT_LABEL[v]} / faster naive = {best:.2f}x req/s ("
                                + ", ".join(f"{_f(x, '{:.2f}x')} vs {n}" for n, x in each.items()) + ")")
                        if m == "mlp" and v == "json" and top:
                            verdict = "stretch met" if best >= 1.5 else ("met" if best >= 1.0 else "NOT met")
                            line += f" -- target >= 1.0x, stretch >= 1.5x: {verdict}"
                        if m == "mlp" or v != "json":
                            lines.append(line)
                        rep[f"{m}_c{c}_{v}_vs_naive"] = best
                        rep.update({f"{m}_c{c}_{v}_vs_{n}": x for n, x in each.items()})
                    g = pair_ratio(rows, "main", "grpc", "json", m, c)
                    if g is not None and m == "mlp":
                        lines.append(f"MLP c={c}: gRPC / HTTP/JSON = {g:.2f}x req/s")
                    rep[f"{m}_c{c}_grpc_vs_json"] = g
        if "delay" in self.parts:
            for c in self.args.delay_concurrency:
                p0 = cell(rows, "delay", self.args.delay_variant, "mlp", c, "p50_ms")
                r0 = cell(rows, "delay", self.args.delay_variant, "mlp", c, "throughput_rps")
                for d in self.args.delays:
                    if not d:
                        continue
                    name = f"mlp_delay{d}"
                    p = cell(rows, "delay", self.args.delay_variant, name, c, "p50_ms")
                    r = cell(rows, "delay", self.args.delay_variant, name, c, "throughput_rps")
                    if None not in (p, p0, r, r0):
                        lines.append(f"MLP c={c} delay {d} us vs 0: p50 {p:.3f} vs {p0:.3f} ms, "
                                     f"req/s {r / r0:.2f}x")
        if "rss_run" in self.report:
            rr = self.report["rss_run"]
            lines.append(f"RSS over {self.args.rss_seconds:.0f}s at c={self.args.rss_concurrency} (MLP): "
                         f"{rr['first_mb']:.1f} -> {rr['last_mb']:.1f} MB, growth {rr['growth_mb']:+.2f} MB "
                         f"({'flat' if rr['flat'] else 'GROWS'})")
        if "memory" in self.report:
            mem = {e["instances"]: e for e in self.report["memory"]}
            if {0, 1, 2} <= set(mem):
                for state in ("idle", "after"):
                    if state == "idle" or "after" in mem[1]:
                        base = mem[0]["idle"]["rss_mb"]
                        one, two = mem[1][state]["rss_mb"], mem[2][state]["rss_mb"]
                        lines.append(f"CNN RSS {state}: 0 -> 1 instance +{one - base:.1f} MB, "
                                     f"1 -> 2 instances +{two - one:.1f} MB")
        self.report["summary"] = rep
        return lines

    def tables(self) -> str:
        md = []
        if self.ceilings:
            cols = ["model", "batch", "samples/s", "CPU ms/sample"]
            rows = [[m, str(b), f"{v:,.1f}", f"{self.ceiling_cpu[m][b]:.4g}"]
                    for m, d in self.ceilings.items() for b, v in d.items()]
            md += ["### Raw onnxruntime (in-process ceiling)", "", markdown_table(cols, rows), ""]
        if any(r.part == "main" for r in self.rows):
            cols, rows, noisy = main_table(self.rows)
            print_table("naive FastAPI vs inferstack, closed loop (! = other processes used > 0.25 cores)",
                        cols, rows, noisy)
            md += ["### Servers" + (", every round" if self.args.rounds > 1 else ""), "",
                   markdown_table(cols, rows), ""]
            if self.args.rounds > 1:
                cols, rows, noisy = median_table(self.rows)
                print_table(f"median of {self.args.rounds} rounds", cols, rows, noisy)
                md += [f"### Servers, median of {self.args.rounds} rounds", "", markdown_table(cols, rows), ""]
        if any(r.part == "delay" for r in self.rows):
            cols, rows, noisy = delay_table(self.rows)
            print_table(f"MLP, max_queue_delay_microseconds, {VARIANT_LABEL[self.args.delay_variant]}",
                        cols, rows, noisy)
            md += ["### max_queue_delay_microseconds (MLP)", "", markdown_table(cols, rows), ""]
        if "memory" in self.report:
            cols = ["CNN instances", "RSS idle MB", "anon MB", "RSS after batch-16 requests MB", "anon MB", "threads"]
            rows = [[str(e["instances"]), f"{e['idle']['rss_mb']:.1f}", f"{e['idle']['anon_mb']:.1f}",
                     _f(e.get("after", {}).get("rss_mb")), _f(e.get("after", {}).get("anon_mb")),
                     str(e["threads"])] for e in self.report["memory"]]
            print_table("server resident memory (0 = empty repository)", cols, rows)
            md += ["### Memory per CNN instance", "", markdown_table(cols, rows), ""]
        profiles = [r for r in self.rows if r.profile]
        for r in profiles:
            s = summarize_pyspy(Path(r.profile))
            self.report.setdefault("profiles", {})[f"{r.model} {r.variant} c={r.concurrency}"] = s
            for name, t in list(s["threads"].items())[:3]:
                cols = ["self %", "function (self)", "incl %", "function (inclusive, below the thread's entry)"]
                rows = []
                for i in range(max(len(t["self"]), len(t["inclusive"]))):
                    a = t["self"][i] if i < len(t["self"]) else ("", None)
                    b = t["inclusive"][i] if i < len(t["inclusive"]) else ("", None)
                    rows.append([_f(a[1]), a[0], _f(b[1]), b[0]])
                title = (f"py-spy: inferstack, {r.model} {VARIANT_LABEL[r.variant]} c={r.concurrency}, thread {name} "
                         f"({t['pct_of_samples']:.0f}% of {s['samples']} samples; % of all samples)")
                print_table(title, cols, rows)
                md += [f"#### {title}", "", markdown_table(cols, rows), ""]
        return "\n".join(md)

    # -- the run ----------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        run_async = asyncio.run
        try:
            import uvloop

            run_async = uvloop.run
        except ImportError:
            pass
        t_start = time.perf_counter()
        self.build()
        need_servers = bool(self.parts & {"main", "delay"})
        if "main" in self.parts or "memory" in self.parts:
            self.measure_ceilings()
        if need_servers:
            hp, mp, gp, np_, np2 = free_ports(5)
            isrv = self.start("inferstack", self.inferstack_argv(self.repo, hp, mp, gp), hp)
            targets = {"inferstack": Target("127.0.0.1", hp, gp, isrv.pid, True)}
            naive_repo = self.work / "naive-models"
            for m in self.models:
                _link_or_copy(self.paths[m], naive_repo / m / "1" / "model.onnx")
            for v, port, handler in (("naive", np_, "sync"), ("naive_async", np2, "async")):
                if "main" in self.parts and v in self.variants:
                    nsrv = self.start(v, [a.python, str(HERE / "naive_server.py"), "--model-repository",
                                          str(naive_repo), "--port", str(port), "--handler", handler], port)
                    targets[v] = Target("127.0.0.1", port, None, nsrv.pid, False)
            self.report["servers"] = {k: asdict(v) for k, v in targets.items()}
            self.validate(targets, run_async)

            async def drive() -> None:
                if "main" in self.parts:
                    await self.main_part(targets)
                if "delay" in self.parts:
                    await self.delay_part(targets)

            run_async(drive())
            self.stop_servers()
        if "rss" in self.parts:
            run_async(self.rss_part(self.rss_server()))
            self.stop_servers()
        if "memory" in self.parts:
            self.memory_part(run_async)
        self.report["rows"] = [asdict(r) for r in self.rows]
        self.report["elapsed_s"] = time.perf_counter() - t_start
        self.report["host"]["load_avg_at_end"] = os.getloadavg()
        if self.ceilings:
            bs.print_ceiling(self.ceilings, self.ceiling_cpu)
        md = self.tables()
        lines = self.summary()
        noisy = sum(r.noisy for r in self.rows)
        if self.rows:
            lines.append(f"{noisy} of {len(self.rows)} levels noisy (other processes > {NOISY_OTHER_CORES} cores); "
                         f"load average {self.report['host']['load_avg_at_start'][0]:.1f} at start, "
                         f"{self.report['host']['load_avg_at_end'][0]:.1f} at end")
        lines.append(f"elapsed {self.report['elapsed_s']:.0f}s; inferstack at {self.report['host']['git']}; "
                     f"{self.report['host']['cpus']} CPUs; Python {self.report['host']['python']}, "
                     f"onnxruntime {self.report['host'].get('onnxruntime', '?')}")
        for line in lines:
            log(line)
        if a.markdown is not None:
            a.markdown.parent.mkdir(parents=True, exist_ok=True)
            a.markdown.write_text(md + "\n### Summary\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
            log(f"wrote {a.markdown}")
        errors = sum(r.result.errors for r in self.rows) + self.report.get("rss_run", {}).get("errors", 0)
        return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Clients.grpc_channels = max(1, args.grpc_channels)
    Clients.grpc_client = args.grpc_client
    tmp = None
    if args.work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="inferstack-compare-"))
        work = tmp
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    run = Run(args, work)
    rc = 1
    try:
        rc = run.run()
    except KeyboardInterrupt:
        log("[yellow]interrupted[/yellow]")
        rc = 130
    except Exception as e:  # noqa: BLE001
        log(f"[red]benchmark failed: {e}[/red]")
        run.report["error"] = repr(e)
        rc = 1
    finally:
        for srv in run.servers:
            srv.stop()
        if args.json is not None:
            run.report.setdefault("rows", [asdict(r) for r in run.rows])
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_bytes(orjson.dumps(run.report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                               | orjson.OPT_NON_STR_KEYS))
            log(f"wrote {args.json}")
        if tmp is not None:
            if args.keep or rc != 0:
                log(f"work dir kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
