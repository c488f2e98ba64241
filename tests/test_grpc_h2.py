"""inferstack's own gRPC-over-HTTP/2 server and perf's HTTP/2 gRPC client, at the protocol level.

The server runs in the test's event loop with small custom methods (bytes in,
bytes out) and is driven by grpc.aio, the independent reference peer: flow
control both ways on messages far over the default windows, deadlines,
cancellation, compression, size limits, errors with non-ASCII messages,
bidirectional streaming, bad clients, graceful stop. Perf's client is checked
against both servers (grpc.aio's and ours). The KServe service itself over
this server is covered by test_grpc.py and the tritonclient tests.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest

from inferstack.perf.grpc_h2 import GrpcCallError, GrpcH2Channel
from inferstack.transports.grpc_h2 import GrpcH2Server, Method
from tests.support import free_port

SERVICE = "/test.Echo/"
LIMIT = 64 * 1024 * 1024


class Probe:
    """What the handlers saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.metadata: list[tuple] = []  # every Echo call's invocation metadata


def _methods(probe: Probe) -> dict[str, Method]:
    async def echo(request: bytes, context) -> bytes:
        probe.metadata.append(context.invocation_metadata())
        return request

    async def double(request: bytes, context) -> bytes:
        return request * 2

    async def slow(request: bytes, context) -> bytes:
        probe.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return request

    async def fail(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input: {request.decode()} – größer als 100%")
        return b""

    async def crash(request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    async def chat(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()

    def method(name, handler, streaming=False):
        return SERVICE + name, Method(name, bytes, handler, streaming, streaming, serialize=bytes)

    return dict([method("Echo", echo), method("Double", double), method("Slow", slow), method("Fail", fail),
                 method("Crash", crash), method("Chat", chat, streaming=True)])


def run(scenario, **server_options):
    """Serve the test methods on a free port, run ``scenario(server, port, probe)``, stop the server."""

    async def main():
        probe = Probe()
        options = {"max_message_bytes": LIMIT, **server_options}
        server = GrpcH2Server(None, "127.0.0.1", free_port(), methods=_methods(probe), **options)
        port = await server.start()
        try:
            return await asyncio.wait_for(scenario(server, port, probe), 120)
        finally:
            await server.stop(0)

    return asyncio.run(main())


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])


def test_unary_echo_and_metadata():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            echo = ch.unary_unary(SERVICE + "Echo")
            assert await echo(b"hello", metadata=(("x-request-id", "abc"), ("trace-bin", b"\x00\x01")),
                              timeout=30) == b"hello"
            assert await echo(b"", timeout=30) == b""  # an empty message is a message
            results = await asyncio.gather(*(echo(str(i).encode(), timeout=30) for i in range(200)))
            assert results == [str(i).encode() for i in range(200)]
        assert ("x-request-id", "abc") in probe.metadata[0]
        assert ("trace-bin", b"\x00\x01") in probe.metadata[0]
        assert all(("x-request-id", "abc") not in m for m in probe.metadata[1:])

    run(scenario)


def test_messages_far_over_the_flow_control_windows_both_ways():
    # 20 MB in, 40 MB out: past our 8 MiB stream window (WINDOW_UPDATEs sent by the
    # server) and grpc's 64 KiB initial window (the server waits for the client's).
    async def scenario(server, port, probe):
        payload = bytes(range(256)) * (20 * 1024 * 1024 // 256)
        async with channel(port) as ch:
            doubled = await ch.unary_unary(SERVICE + "Double")(payload, timeout=60)
        assert len(doubled) == 2 * len(payload) and doubled[: len(payload)] == payload

    run(scenario)


def test_deadline_cancels_the_handler_and_answers_deadline_exceeded():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(SERVICE + "Slow")(b"x", timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(probe.cancelled.wait(), 10)
            assert await ch.unary_unary(SERVICE + "Echo")(b"still", timeout=30) == b"still"

    run(scenario)


def test_client_cancel_reaches_the_handler():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            call = ch.unary_unary(SERVICE + "Slow")(b"x", timeout=60)
            await asyncio.wait_for(probe.started.wait(), 10)
            call.cancel()
            await asyncio.wait_for(probe.cancelled.wait(), 10)

    run(scenario)


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_inflated(compression):
    async def scenario(server, port, probe):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=compression) as ch:
            payload = b"abc" * 100_000
            assert await ch.unary_unary(SERVICE + "Echo")(payload, timeout=30) == payload

    run(scenario)


def test_message_over_the_limit_is_resource_exhausted_and_names_the_sizes():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(SERVICE + "Echo")(b"x" * 5000, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "5000 vs. 4096" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:  # the answer would be over it
                await ch.unary_unary(SERVICE + "Double")(b"x" * 3000, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "6000 vs. 4096" in info.value.details()
            assert await ch.unary_unary(SERVICE + "Echo")(b"ok", timeout=30) == b"ok"

    run(scenario, max_message_bytes=4096)


def test_compressed_message_cannot_inflate_past_the_limit():
    async def scenario(server, port, probe):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(SERVICE + "Echo")(b"\0" * 100_000, timeout=30)  # ~100 bytes compressed
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(scenario, max_message_bytes=4096)


def test_errors_keep_their_code_and_non_ascii_message():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(SERVICE + "Fail")(b"7", timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "bad input: 7 – größer als 100%"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(SERVICE + "Crash")(b"", timeout=30)
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert "boom" not in info.value.details()  # details stay in the server log
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary("/test.Echo/Nope")(b"", timeout=30)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "/test.Echo/Nope" in info.value.details()

    run(scenario)


def test_bidirectional_stream():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            call = ch.stream_stream(SERVICE + "Chat")(timeout=30)
            answers = []
            for word in (b"a", b"bc", b"x" * 200_000):
                await call.write(word)
                answers.append(await call.read())
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert answers == [b"A", b"BC", b"X" * 200_000]
            assert await call.code() == grpc.StatusCode.OK

    run(scenario)


def test_a_client_that_is_not_http2_is_dropped_and_others_are_served():
    async def scenario(server, port, probe):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # server sends its SETTINGS, then GOAWAY and closes
        assert data[3] == 0x4  # the first frame is SETTINGS
        writer.close()
        async with channel(port) as ch:
            assert await ch.unary_unary(SERVICE + "Echo")(b"fine", timeout=30) == b"fine"

    run(scenario)


def test_stop_lets_running_calls_finish_within_the_grace():
    async def scenario(server, port, probe):
        async with channel(port) as ch:
            slowish = asyncio.ensure_future(ch.unary_unary(SERVICE + "Echo")(b"x" * 10_000_000, timeout=30))
            await asyncio.sleep(0)
            running = asyncio.ensure_future(ch.unary_unary(SERVICE + "Slow")(b"x", timeout=30))
            await asyncio.wait_for(probe.started.wait(), 10)
            await server.stop(0.5)
            assert len(await slowish) == 10_000_000
            with pytest.raises(grpc.aio.AioRpcError):  # cancelled after the grace
                await running
        with socket.socket() as s:  # no longer listening
            assert s.connect_ex(("127.0.0.1", port)) != 0

    run(scenario)


# -- perf's client ---------------------------------------------------------------------


async def _client_checks(port: int) -> None:
    ch = GrpcH2Channel("127.0.0.1", port)
    try:
        assert await ch.unary(SERVICE + "Echo", b"hi", 30) == b"hi"
        payload = b"\x07" * (12 * 1024 * 1024)  # over any default window, both ways
        assert await ch.unary(SERVICE + "Double", payload, 60) == payload * 2
        results = await asyncio.gather(*(ch.unary(SERVICE + "Echo", str(i).encode(), 30) for i in range(300)))
        assert results == [str(i).encode() for i in range(300)]
        with pytest.raises(GrpcCallError) as info:
            await ch.unary(SERVICE + "Fail", b"1", 30)
        assert info.value.code == 3 and info.value.details == "bad input: 1 – größer als 100%"
        with pytest.raises(GrpcCallError) as info:
            await ch.unary(SERVICE + "Slow", b"", 0.3)
        assert info.value.code == 4
        assert await ch.unary(SERVICE + "Echo", b"after", 30) == b"after"
    finally:
        await ch.close()


def test_perf_client_against_our_server_with_a_small_stream_limit():
    async def scenario(server, port, probe):
        await _client_checks(port)

    run(scenario, max_concurrent_streams=4)  # 300 concurrent calls wait for stream slots


def test_perf_client_against_grpcio():
    async def main():
        probe = Probe()
        handlers = {}
        for path, method in _methods(probe).items():
            name = path.rsplit("/", 1)[1]
            if not method.client_streaming:
                handlers[name] = grpc.unary_unary_rpc_method_handler(method.handler)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT),
                                          ("grpc.max_send_message_length", LIMIT)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(_client_checks(port), 120)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_perf_client_reports_an_unreachable_server():
    async def main():
        ch = GrpcH2Channel("127.0.0.1", free_port(), connect_timeout=5)
        with pytest.raises(GrpcCallError) as info:
            await ch.unary(SERVICE + "Echo", b"", 5)
        assert info.value.code == 14 and "cannot connect" in info.value.details

    asyncio.run(main())
