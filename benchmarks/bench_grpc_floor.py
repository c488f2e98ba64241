"""The floor under any Python gRPC server: an echo RPC, no model, no codec.

Why: inferstack's gRPC transport spends more server CPU per request than its
HTTP transport (docs/performance.md). This script measures how much of that is
grpc-python itself, by serving a unary echo of a 300-byte payload (about an
MLP request) from

- ``grpc.aio`` (what inferstack uses), on asyncio and on uvloop, and
- the thread-pool ``grpc.server``, and
- inferstack's own gRPC-over-HTTP/2 server (``transports/grpc_h2.py``, what
  ``inferstack serve`` uses by default) on uvloop,

driven by a grpc.aio client at a fixed concurrency, and prints requests/s and
server CPU microseconds per request (user+sys of the server process from
/proc, which a busy machine disturbs far less than throughput).

    .venv/bin/python benchmarks/bench_grpc_floor.py [--requests 6000] [--concurrency 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from concurrent import futures

import grpc

SERVICE, METHOD = "bench.Echo", "Echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _handler(fn) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(fn)})


def _serve_sync(port: int, ready, stop) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handler(lambda request, context: request),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    stop.wait()
    server.stop(0)


def _serve_aio(port: int, ready, stop, use_uvloop: bool) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(echo),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(0)

    if use_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main())


async def _drive(port: int, requests: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        payload = b"x" * 300
        for _ in range(100):
            await call(payload)
        sent = 0

        async def client() -> None:
            nonlocal sent
            while sent < requests:
                sent += 1
                assert await call(payload) == payload

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start


def _serve_h2(port: int, ready, stop) -> None:
    from inferstack.transports.grpc_h2 import GrpcH2Server, Method

    async def echo(request: bytes, context) -> bytes:
        return request

    async def main() -> None:
        method = Method(METHOD, bytes, echo, serialize=bytes)
        server = GrpcH2Server(None, "127.0.0.1", port, max_message_bytes=1 << 20,
                              methods={f"/{SERVICE}/{METHOD}": method})
        await server.start()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(0)

    import uvloop

    uvloop.install()
    asyncio.run(main())


def measure(kind: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests/s, server CPU µs per request) for one server kind."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = _free_port()
    if kind == "sync":
        process = ctx.Process(target=_serve_sync, args=(port, ready, stop))
    elif kind == "inferstack":
        process = ctx.Process(target=_serve_h2, args=(port, ready, stop))
    else:
        process = ctx.Process(target=_serve_aio, args=(port, ready, stop, kind == "aio+uvloop"))
    process.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"{kind} server did not start")
        before = _cpu_seconds(process.pid)
        elapsed = asyncio.run(_drive(port, requests, concurrency))
        used = _cpu_seconds(process.pid) - before
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
    return requests / elapsed, 1e6 * used / requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    kinds = ["aio", "aio+uvloop", "sync", "inferstack"]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:  # interleaved, so drift in machine load hits every kind alike
            results[kind].append(measure(kind, args.requests, args.concurrency))
    print(f"echo RPC, 300-byte payload, concurrency {args.concurrency}, {args.requests} requests x {args.rounds} rounds")
    print(f"{'server':<12} {'req/s (median)':>15} {'server CPU us/req (median)':>28}")
    for kind in kinds:
        rates = [r for r, _ in results[kind]]
        cpus = [c for _, c in results[kind]]
        print(f"{kind:<12} {statistics.median(rates):>15,.0f} {statistics.median(cpus):>28,.0f}")


if __name__ == "__main__":
    main()
