#!/usr/bin/env python
"""How much load can one ``inferstack perf`` client core generate?

Runs the perf engine (``inferstack.perf``: the same generator, windows and
recording ``inferstack perf`` uses) against *stand-in* servers that answer
every request with a fixed, pre-built response and do no other work, so the
numbers are the client's:

* HTTP: an asyncio ``Protocol`` on uvloop that parses just enough HTTP/1.1
  (head + Content-Length) and writes a fixed 200 response with a binary
  ``OUTPUT0`` of 10 FP32 values (the size of the example ``mlp``'s answer);
* gRPC: a ``grpc.aio`` server with a generic handler for
  ``inference.GRPCInferenceService/ModelInfer`` that returns fixed response
  bytes (no protobuf parsing on either side of the handler), driven by perf's
  own HTTP/2 gRPC client (``grpc``, the default of ``inferstack perf``) and by
  the grpc.aio client (``grpcio``, ``--grpc-client grpcio``).

The stand-in runs in its own process (this script with ``--serve``). For each
protocol and concurrency the client runs one level (``--windows`` windows of
``--window`` seconds, stability not required) and reports requests/s, the
client's own CPU (user+sys of this process, from ``os.times``) and the
derived *requests per client CPU-second*: the capacity of one client core
when the server is not the limit. On a 2-core machine client and stand-in
share the cores, so requests/s is often the stand-in's limit; the CPU-based
capacity is the number to compare with what a server under test can do.

Example::

    .venv/bin/python benchmarks/bench_perf_client.py
    .venv/bin/python benchmarks/bench_perf_client.py --protocols http --concurrency 1,8,64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from inferstack.perf.clients import HttpClient, grpc_infer_request
from inferstack.perf.engine import Controller, EngineSettings, GeneratorConfig, LevelSpec, LoadGenerator

MODEL = "mlp"
_OUT_JSON = orjson.dumps({
    "model_name": MODEL, "model_version": "1",
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}],
})
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
    b"inference-header-content-length: %d\r\ncontent-length: %d\r\n\r\n" % (len(_OUT_JSON), len(_OUT_JSON) + 40)
) + _OUT_JSON + bytes(40)


# --------------------------------------------------------------------------------------
# Stand-in servers (run with --serve)
# --------------------------------------------------------------------------------------


class _FixedHttp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            length = 0
            for line in buf[:end].split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            out.append(HTTP_RESPONSE)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


async def _serve_http(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_FixedHttp, "127.0.0.1", port, reuse_address=True)
    print("ready", flush=True)
    await server.serve_forever()


async def _serve_grpc(port: int) -> None:
    import grpc

    from inferstack._proto import grpc_service_pb2 as pb

    response = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(bytes(40))
    fixed = response.SerializeToString()

    async def infer(request: bytes, context: object) -> bytes:
        return fixed

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve(protocol: str, port: int) -> None:
    import uvloop

    uvloop.run(_serve_http(port) if protocol == "http" else _serve_grpc(port))


# --------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", protocol, str(self.port)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"{protocol} stand-in did not start")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _request(protocol: str, port: int) -> bytes:
    """A binary-tensor / raw-contents request for a [1, 64] FP32 input, as perf builds it."""
    raw = bytes(64 * 4)
    if protocol == "grpc":
        return grpc_infer_request(MODEL, "", [("INPUT0", "FP32", [1, 64], raw)], ["OUTPUT0"])
    header = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]})
    return HttpClient("127.0.0.1", port, MODEL).infer_request(header + raw, len(header))


async def measure(protocol: str, standin: StandIn, concurrency: int, window: float, windows: int) -> dict:
    """``protocol``: http, grpc (perf's own HTTP/2 gRPC client) or grpcio (the grpc.aio client)."""
    wire = "http" if protocol == "http" else "grpc"
    config = GeneratorConfig(protocol=wire, host="127.0.0.1", port=standin.port, model=MODEL, version="",
                             requests=[_request(wire, standin.port)], interval=window, max_trials=windows,
                             grpc_client="grpcio" if protocol == "grpcio" else "inferstack")
    generator = LoadGenerator(config)
    # A stability band no level meets: every level runs exactly `windows` windows.
    controller = Controller(generator, EngineSettings(batch_size=1, interval=window, stability_percentage=1e-9,
                                                      max_trials=windows))
    c0, s0, t0 = os.times(), standin.cpu_seconds(), time.perf_counter()
    try:
        result = await controller.run_level(LevelSpec("concurrency", concurrency))
    finally:
        await generator.close()
    c1, s1, t1 = os.times(), standin.cpu_seconds(), time.perf_counter()
    elapsed = t1 - t0
    client_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    completed = result.total_completed
    return {
        "protocol": protocol, "concurrency": concurrency,
        "req_per_s": result.request_throughput,
        "p50_us": result.latency("p50"), "p99_us": result.latency("p99"),
        "errors": result.total_errors, "first_error": result.first_error,
        "client_cores": client_cpu / elapsed,
        "standin_cores": (s1 - s0) / elapsed,
        "client_us_per_req": 1e6 * client_cpu / completed if completed else None,
        "req_per_client_cpu_s": completed / client_cpu if client_cpu > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=2, metavar=("PROTOCOL", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--protocols", default="http,grpc,grpcio",
                    help="http, grpc (perf's HTTP/2 gRPC client), grpcio (grpc.aio client); default: %(default)s")
    ap.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated (default: %(default)s)")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per window (default: %(default)s)")
    ap.add_argument("--windows", type=int, default=3, help="windows per level (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0

    import uvloop
    from rich.console import Console
    from rich.table import Table

    results = []
    for protocol in [p.strip() for p in args.protocols.split(",") if p.strip()]:
        standin = StandIn("http" if protocol == "http" else "grpc")
        try:
            for c in [int(v) for v in args.concurrency.split(",")]:
                r = uvloop.run(measure(protocol, standin, c, args.window, args.windows))
                results.append(r)
                print(f"{protocol} c={c}: {r['req_per_s']:,.0f} req/s, client {r['client_cores']:.2f} cores, "
                      f"{r['req_per_client_cpu_s'] or 0:,.0f} req per client CPU-second", flush=True)
        finally:
            standin.stop()
    table = Table(title=f"perf client against a fixed-response stand-in ({os.cpu_count()} CPUs)")
    for col in ("protocol", "concurrency", "req/s", "p50 us", "p99 us", "client cores", "stand-in cores",
                "client us/req", "req per client CPU-s", "errors"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["protocol"], str(r["concurrency"]), f"{r['req_per_s']:,.0f}", f"{r['p50_us'] or 0:,.0f}",
                      f"{r['p99_us'] or 0:,.0f}", f"{r['client_cores']:.2f}", f"{r['standin_cores']:.2f}",
                      f"{r['client_us_per_req'] or 0:.1f}", f"{r['req_per_client_cpu_s'] or 0:,.0f}", str(r["errors"]))
    Console(width=200).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
