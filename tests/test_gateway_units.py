"""Gateway pieces without processes: config and policy validation, choice, budget, breaker, wire rewrite."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.gateway.config import ConfigError, parse_config, parse_replica
from inferstack.gateway.grpc import read_name_version, retarget
from inferstack.gateway.policies import Target, check_targets_exist, parse_policy
from inferstack.gateway.replicas import parse_pending
from inferstack.gateway.resilience import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RetryBudget


def test_replica_spec_defaults_follow_triton_ports() -> None:
    spec = parse_replica("http://10.0.0.5:8000")
    assert (spec.http, spec.grpc, spec.metrics) == ("http://10.0.0.5:8000", "10.0.0.5:8001",
                                                    "http://10.0.0.5:8002/metrics")
    spec = parse_replica("127.0.0.1:9100,grpc=127.0.0.1:9200,metrics=none")
    assert (spec.http, spec.grpc, spec.metrics) == ("http://127.0.0.1:9100", "127.0.0.1:9200", None)
    with pytest.raises(ConfigError, match="--replica"):
        parse_replica("http://nohost")
    with pytest.raises(ConfigError, match="grpc=HOST:PORT"):
        parse_replica("http://a:1,foo=bar")


@pytest.mark.parametrize(("document", "field"), [
    ({"listen": {"http_prot": 1}}, "listen: unknown key(s) http_prot"),
    ({"routing": {"max_attempts": 0}}, "routing.max_attempts"),
    ({"auth": {"api_keys": [{"name": "k", "sha256": "abc"}]}}, "auth.api_keys[0].sha256"),
    ({"auth": {"jwt": {"audience": "x"}}}, "auth.jwt"),
    ({"rate_limits": {"per_model": {"m": {"burst": 3}}}}, "rate_limits.per_model.m.rps"),
    ({"tls": {"cert": "c.pem"}}, "tls"),
])
def test_config_errors_name_the_field(document: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document)
    assert field in str(info.value)


def test_policy_validation_and_choice() -> None:
    policy = parse_policy("m", {"variants": [{"name": "a", "version": 1, "weight": 90},
                                             {"name": "b", "model": "m2", "weight": 10}],
                                "rules": [{"header": "X-Canary", "equals": True, "variant": "b"}],
                                "sticky": {"header": "x-user"}})
    assert policy.choose({"x-canary": "true"}).name == "b"
    # Sticky: one key, one variant, whatever the draw; the split over many keys follows the weights.
    assert len({policy.choose({"x-user": "alice"}, rng=random.Random(i)).name for i in range(20)}) == 1
    counts = Counter(policy.choose({"x-user": f"user{i}"}).name for i in range(5000))
    assert 350 < counts["b"] < 650
    check_targets_exist(policy, {"m": {"1"}, "m2": {"1"}})
    with pytest.raises(ConfigError, match=r"variants\[1\].model"):
        check_targets_exist(policy, {"m": {"1"}})
    with pytest.raises(ConfigError, match=r"variants\[0\].version"):
        check_targets_exist(policy, {"m": {"2"}, "m2": {"1"}})
    for bad, message in [
        ({"variants": []}, "non-empty"),
        ({"variants": [{"name": "a", "weight": 50}]}, "sum to 100"),
        ({"variants": [{"name": "a", "weight": 100}, {"name": "a", "weight": 0}]}, "duplicate"),
        ({"variants": [{"name": "a", "weight": 100}], "shadow": {"model": "x", "percent": 150}}, "shadow.percent"),
        ({"variants": [{"name": "a", "weight": 100}], "sticky": {}}, "sticky"),
        ({"variants": [{"name": "a", "weight": 100, "version": "v2"}]}, "version"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_policy("m", bad)
    assert parse_policy("m", policy.to_dict()).to_dict() == policy.to_dict()


def test_weighted_draw_and_zero_weight() -> None:
    policy = parse_policy("m", {"variants": [{"name": "a", "weight": 100}, {"name": "b", "weight": 0}]})
    rng = random.Random(1)
    assert {policy.choose({}, rng=rng).name for _ in range(1000)} == {"a"}


def test_retry_budget() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.5)  # 5 retries floor per 10 s window
    for _ in range(100):
        budget.record_request()
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed == 25  # 5 + 20% of 100


def test_circuit_breaker() -> None:
    breaker = CircuitBreaker(failures=3, open_s=0.05)
    for _ in range(3):
        assert breaker.allow()
        breaker.on_failure()
    assert breaker.state == OPEN and not breaker.allow()
    import time

    time.sleep(0.06)
    assert breaker.allow() and breaker.state == HALF_OPEN
    breaker.on_attempt()
    assert not breaker.allow()  # one probe at a time
    breaker.on_failure()
    assert breaker.state == OPEN
    time.sleep(0.06)
    assert breaker.allow()
    breaker.on_attempt()
    breaker.on_success()
    assert breaker.state == CLOSED and breaker.allow()
    rate = CircuitBreaker(failures=100, error_rate=0.5, min_requests=10)
    for i in range(20):
        (rate.on_failure if i % 3 else rate.on_success)()
    assert rate.state == OPEN


def test_grpc_wire_rewrite() -> None:
    request = pb.ModelInferRequest(model_name="mlp", model_version="3", id="r1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    data = request.SerializeToString()
    assert read_name_version(data) == ("mlp", "3")
    rewritten = pb.ModelInferRequest.FromString(retarget(data, Target("other", "")))
    assert (rewritten.model_name, rewritten.model_version, rewritten.id) == ("other", "", "r1")
    assert rewritten.raw_input_contents[0] == b"\x00" * 16
    assert read_name_version(retarget(data, Target("x" * 300, "12"))) == ("x" * 300, "12")


def test_parse_pending() -> None:
    text = ('# HELP x\ninferstack_pending_requests{model="a",version="1"} 3.0\n'
            'inferstack_pending_requests{model="a",version="2"} 1.0\n'
            'inferstack_pending_requests{model="b",version="1"} 0.0\ninferstack_other{model="a"} 9\n')
    assert parse_pending(text) == {"a": 4.0, "b": 0.0}


def test_upstream_client_framing_reuse_timeout_and_connect_errors() -> None:
    import asyncio

    from inferstack.gateway.upstream import HttpUpstream, UpstreamError

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                if b"/chunked" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                elif b"/close" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
                    writer.close()
                    return
                elif b"/hang" in head:
                    await asyncio.sleep(3)
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HttpUpstream(f"http://127.0.0.1:{port}")
        assert await client.request(b"POST", "/x", b"", b"body") == (201, {"content-length": "3", "x-a": "b"}, b"abc")
        assert len(client._idle) == 1  # kept alive
        assert (await client.request(b"POST", "/chunked", b"", b""))[2] == b"hello world"
        assert (await client.request(b"GET", "/close", b""))[2] == b"until-close"
        with pytest.raises(TimeoutError):
            await client.request(b"GET", "/hang", b"", timeout=0.2)
        assert (await client.request(b"GET", "/x", b""))[0] == 201
        client.close()
        server.close()
        with pytest.raises(UpstreamError) as info:
            await HttpUpstream(f"http://127.0.0.1:{port}").request(b"GET", "/", b"")
        assert info.value.connect

    asyncio.run(main())


def test_http_server_keepalive_pipelining_chunked_limits() -> None:
    import asyncio

    from inferstack.gateway.httpserver import HttpServer, Request, Response

    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/slow":
            await asyncio.sleep(0.1)
        body = f"{request.method} {request.path} {request.query.decode()} {len(request.body)}".encode()
        return Response(200, body, [(b"x-echo", request.headers.get(b"x-echo", b""))])

    async def exchange(port: int, data: bytes, responses: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        out = []
        for _ in range(responses):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            out.append(head.split(b"\r\n")[0] + b" | " + await reader.readexactly(length))
        writer.close()
        return out

    async def main() -> None:
        server = HttpServer(handler, max_body=100)
        port = await server.start("127.0.0.1", 0)
        # Pipelined: answered in order although the first is slower.
        answers = await exchange(port, b"GET /slow?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"POST /b%20c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Echo: hi\r\n\r\nabc",
                                 2)
        assert answers == [b"HTTP/1.1 200 OK | GET /slow a=1 0", b"HTTP/1.1 200 OK | POST /b c  3"]
        chunked = await exchange(port, b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 1)
        assert chunked == [b"HTTP/1.1 200 OK | POST /c  5"]
        too_big = await exchange(port, b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"x" * 500, 1)
        assert too_big[0].startswith(b"HTTP/1.1 413") and b"100 bytes" in too_big[0]
        assert (await exchange(port, b"GET /boom HTTP/1.1\r\n\r\n", 1))[0].startswith(b"HTTP/1.1 500")
        assert (await exchange(port, b"NOT HTTP AT ALL\r\n\r\n", 1))[0].startswith(b"HTTP/1.1 400")
        await server.shutdown(1)

    asyncio.run(main())
