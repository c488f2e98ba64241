"""``inferstack perf``: range parsing, stability, schedules, percentiles, inputs, and runs of
the command against the session server over HTTP (binary, JSON), gRPC and in request-rate mode.

Bounded: integration runs use 300 ms windows, at most 3 of them per level, and small ranges.
No assertion depends on how fast the machine is, only on counts being consistent.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.perf import report, runner
from inferstack.perf.clients import (
    PerfSetupError,
    ServerStats,
    error_message,
    grpc_infer_request,
    parse_url,
)
from inferstack.perf.engine import (
    Controller,
    EngineSettings,
    GeneratorConfig,
    LevelSpec,
    LoadGenerator,
    Totals,
    Window,
    is_stable,
    make_schedule,
    parse_range,
    percentile,
    split_share,
    summarize_level,
)
from inferstack.perf.inputs import (
    InputError,
    build_inputs,
    encode_tensors,
    http_body,
    model_info,
    parse_shape_options,
    sample_shapes,
)
from inferstack.protocol import rest

RUN_TIMEOUT = 120  # seconds; a run takes a few


# --------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1", [1]),
    ("1:4", [1, 2, 3, 4]),
    ("1:8:3", [1, 4, 7]),
    ("2:8:2", [2, 4, 6, 8]),
    (" 3:3:5 ", [3]),
])
def test_concurrency_range(text, expected):
    assert parse_range(text, integer=True) == expected


def test_rate_range_allows_fractions_and_includes_the_end():
    assert parse_range("100:300:100", integer=False) == [100.0, 200.0, 300.0]
    assert parse_range("0.5:1.5:0.5", integer=False) == [0.5, 1.0, 1.5]
    assert parse_range("0.1:0.3:0.1", integer=False) == [0.1, 0.2, 0.3]  # no float drift past END
    assert parse_range("250", integer=False) == [250.0]


@pytest.mark.parametrize("text", ["", "0:4", "4:1", "1:4:0", "1:4:-1", "a:b", "1:2:3:4", "1::2", "1.5:2"])
def test_bad_ranges_are_clear_errors(text):
    with pytest.raises(PerfSetupError, match="--concurrency-range"):
        parse_range(text, integer=True, option="--concurrency-range")


def test_levels_need_one_range_and_default_to_concurrency_1():
    assert [(l.mode, l.value) for l in runner.levels_of(runner.PerfSettings(model="m"))] == [("concurrency", 1)]
    rate = runner.levels_of(runner.PerfSettings(model="m", request_rate_range="10:30:10"))
    assert [(l.mode, l.value) for l in rate] == [("rate", 10.0), ("rate", 20.0), ("rate", 30.0)]
    with pytest.raises(PerfSetupError, match="not both"):
        runner.levels_of(runner.PerfSettings(model="m", concurrency_range="1", request_rate_range="1"))


# --------------------------------------------------------------------------------------
# Stability, percentiles, schedules
# --------------------------------------------------------------------------------------


def test_stability_needs_three_windows_within_the_band():
    assert not is_stable([], 10)
    assert not is_stable([100, 100], 10)
    assert is_stable([100, 100, 100], 10)
    assert is_stable([100, 109, 91], 10)  # mean 100: every value within 10 %
    assert not is_stable([100, 112, 88], 10)
    assert is_stable([10, 500, 100, 104, 97], 5)  # only the last three count
    assert not is_stable([0, 0, 0], 10)  # nothing completed is never stable
    assert is_stable([100, 120, 80], 20) and not is_stable([100, 120, 80], 19.9)


def test_percentile_is_nearest_rank():
    values = np.arange(1, 101, dtype=float)  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 99.5) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # an observed value, not 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_poisson_schedule_has_the_mean_rate_and_exponential_gaps():
    rng = np.random.default_rng(7)
    times = make_schedule(1000.0, 20.0, "poisson", rng)
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < 20.0
    assert len(times) / 20.0 == pytest.approx(1000.0, rel=0.03)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.03)
    # exponential: standard deviation equals the mean (a constant schedule's would be 0)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)
    # long levels are built in chunks without gaps or overlaps
    long = make_schedule(50.0, 400.0, "poisson", np.random.default_rng(1))
    assert len(long) / 400.0 == pytest.approx(50.0, rel=0.05) and np.all(np.diff(long) > 0)


def test_constant_schedule_is_evenly_spaced_and_phased():
    times = make_schedule(200.0, 1.0, "constant", np.random.default_rng(0))
    assert len(times) == 200 and np.allclose(np.diff(times), 0.005) and times[0] == 0
    shifted = make_schedule(100.0, 1.0, "constant", np.random.default_rng(0), phase=0.005)
    assert shifted[0] == pytest.approx(0.005) and len(shifted) == 100
    with pytest.raises(ValueError):
        make_schedule(10.0, 1.0, "uniform", np.random.default_rng(0))


def test_split_share_between_workers():
    assert split_share(LevelSpec("concurrency", 5), 2) == [3, 2]
    assert split_share(LevelSpec("concurrency", 1), 3) == [1, 0, 0]
    assert split_share(LevelSpec("rate", 300.0), 3) == [100.0, 100.0, 100.0]


def test_level_summary_merges_the_last_three_windows():
    def window(i: int, ok: int, lat: list[int], errors: int = 0) -> Window:
        return Window(index=i, duration=1.0, sent=ok + errors, ok=ok, errors=errors,
                      latencies_ns=np.asarray(lat, dtype=np.int64), server=ServerStats(success_count=ok))

    windows = [window(0, 1, [10_000_000]), window(1, 2, [1000, 2000]), window(2, 2, [3000, 4000], errors=1),
               window(3, 1, [5000])]
    r = summarize_level(LevelSpec("concurrency", 2), 4, "stable", windows, Totals(9, 8, 1, "HTTP 500: x"),
                        ServerStats(success_count=8), 95)
    assert r.measured_windows == 3 and r.completed == 5 and r.errors == 1 and r.sent == 6
    assert r.throughput == pytest.approx(5 * 4 / 3.0)  # requests x batch size per second
    assert r.latency("max") == 5.0 and r.latency("p50") == 3.0  # us; the 10 ms outlier is not measured
    assert r.server["success_count"] == 5
    assert r.server_total["success_count"] == 8 and r.total_completed == 8
    assert r.first_error == "HTTP 500: x"
    assert [w["completed"] for w in r.windows] == [1, 2, 2, 1]
    merged = Window.merge_parallel([window(0, 2, [1, 2]), window(0, 3, [3, 4, 5])])
    assert merged.ok == 5 and len(merged.latencies_ns) == 5 and merged.duration == 1.0


# --------------------------------------------------------------------------------------
# Clients' helpers
# --------------------------------------------------------------------------------------


def test_urls():
    assert parse_url("localhost", "http") == ("localhost", 8000)
    assert parse_url("localhost", "grpc") == ("localhost", 8001)
    assert parse_url("http://10.0.0.1:9000", "http") == ("10.0.0.1", 9000)
    assert parse_url("127.0.0.1:1234/", "grpc") == ("127.0.0.1", 1234)
    assert parse_url("[::1]:8000", "http") == ("::1", 8000)
    for bad in ("https://x:1", "x:1/v2/models", "x:notaport", ""):
        with pytest.raises(PerfSetupError):
            parse_url(bad, "http")


def test_server_stats_delta_and_averages():
    doc = {"model_stats": [
        {"name": "m", "version": "1", "inference_count": 10, "execution_count": 5,
         "inference_stats": {"success": {"count": 4, "ns": 4000}, "queue": {"count": 4, "ns": 2000},
                             "compute_infer": {"count": 4, "ns": 8000}}},
        {"name": "m", "version": "2", "inference_count": 6, "execution_count": 1,
         "inference_stats": {"success": {"count": 2, "ns": 2000}}},
        {"name": "other", "inference_count": 100},
    ]}
    both = ServerStats.from_document(doc, "m", "")
    assert both.inference_count == 16 and both.success_count == 6
    v1 = ServerStats.from_document(doc, "m", "1")
    assert v1.inference_count == 10
    delta = v1 - ServerStats(success_count=1, success_ns=1000)
    assert delta.success_count == 3 and (delta + ServerStats(success_count=1)).success_count == 4
    d = v1.as_dict()
    assert d["queue_us"] == 0.5 and d["compute_infer_us"] == 2.0 and d["avg_batch_size"] == 2.0
    assert d["compute_input_us"] is None


def test_error_messages_use_the_servers_error_field():
    assert error_message(400, b'{"error": "bad input"}') == "HTTP 400: bad input"
    assert error_message(503, b"Service Unavailable") == "HTTP 503: Service Unavailable"
    assert error_message(500, b"") == "HTTP 500"


# --------------------------------------------------------------------------------------
# Inputs from metadata
# --------------------------------------------------------------------------------------

MLP_META = {"name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]}
DYN_META = {"name": "dyn", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, 3, -1, -1]},
                       {"name": "TEXT", "datatype": "BYTES", "shape": [-1, 2]}],
            "outputs": [{"name": "OUT", "datatype": "FP32", "shape": [-1, 4]}]}


def test_batch_dimension_comes_from_the_config_or_the_leading_minus_one():
    assert model_info(MLP_META, {"max_batch_size": 64}).batching
    assert model_info(MLP_META).batching  # no config: leading -1 on every input
    fixed = model_info(MLP_META, {"max_batch_size": 0})
    assert not fixed.batching
    with pytest.raises(InputError, match="does not support batching"):
        sample_shapes(fixed, {}, 2)
    with pytest.raises(InputError, match="dynamic shape"):  # without batching the -1 is an ordinary dim
        sample_shapes(fixed, {}, 1)
    assert sample_shapes(fixed, parse_shape_options(["INPUT0:1,64"]), 1) == {"INPUT0": [1, 64]}
    with pytest.raises(InputError, match="max_batch_size 64"):
        sample_shapes(model_info(MLP_META, {"max_batch_size": 64}), {}, 65)


def test_dynamic_dims_need_shape_with_a_clear_error():
    model = model_info(DYN_META, {"max_batch_size": 8})
    with pytest.raises(InputError) as err:
        sample_shapes(model, {}, 1)
    assert "IMAGE" in str(err.value) and "--shape IMAGE:3,1,1" in str(err.value)
    shapes = parse_shape_options(["IMAGE:3,32,48"])
    assert sample_shapes(model, shapes, 2) == {"IMAGE": [3, 32, 48], "TEXT": [2]}
    with pytest.raises(InputError, match="does not match"):
        sample_shapes(model, parse_shape_options(["IMAGE:4,32,48"]), 1)  # fixed dim differs
    with pytest.raises(InputError, match="does not match"):
        sample_shapes(model, parse_shape_options(["IMAGE:32,48"]), 1)  # rank differs
    with pytest.raises(InputError, match="no input 'NOPE'"):
        sample_shapes(model, parse_shape_options(["IMAGE:3,1,1", "NOPE:1"]), 1)


@pytest.mark.parametrize("bad", ["INPUT0", "INPUT0:a,b", ":1,2", "INPUT0:-1"])
def test_bad_shape_options(bad):
    with pytest.raises(InputError, match="--shape"):
        parse_shape_options([bad])


def test_zero_and_random_inputs_have_the_full_shapes_and_dtypes():
    model = model_info(DYN_META, {"max_batch_size": 8})
    shapes = parse_shape_options(["IMAGE:3,4,5"])
    (zero,) = build_inputs(model, shapes, 2, "zero")
    assert zero["IMAGE"].shape == (2, 3, 4, 5) and zero["IMAGE"].dtype == np.uint8 and not zero["IMAGE"].any()
    assert zero["TEXT"].shape == (2, 2) and zero["TEXT"][0, 0] == b""
    (rand,) = build_inputs(model, shapes, 2, "random", seed=3)
    assert rand["IMAGE"].shape == (2, 3, 4, 5) and rand["IMAGE"].any()
    assert all(isinstance(v, bytes) and len(v) == 8 for v in rand["TEXT"].reshape(-1))
    (again,) = build_inputs(model, shapes, 2, "random", seed=3)
    assert np.array_equal(again["IMAGE"], rand["IMAGE"])  # seeded


def test_json_input_data_file(tmp_path: Path):
    model = model_info(MLP_META, {"max_batch_size": 64})
    raw = np.full(64, 2.5, dtype="<f4").tobytes()
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [
        {"INPUT0": [1.0] * 64},
        {"INPUT0": {"content": [[2.0] * 32, [2.0] * 32], "shape": [64]}},
        {"INPUT0": {"b64": base64.b64encode(raw).decode()}},
    ]}))
    requests = build_inputs(model, {}, 2, str(data))
    assert len(requests) == 3  # one request per entry, entries k and k+1 stacked into a batch of 2
    assert [r["INPUT0"].shape for r in requests] == [(2, 64)] * 3
    assert requests[0]["INPUT0"][:, 0].tolist() == [1.0, 2.0]
    assert requests[2]["INPUT0"][:, 0].tolist() == [2.5, 1.0]  # wraps around

    dyn = model_info(DYN_META, {"max_batch_size": 8})
    data.write_text(json.dumps({"data": [{"IMAGE": {"content": list(range(12)), "shape": [3, 2, 2]},
                                          "TEXT": ["a", "bc"]}]}))
    (one,) = build_inputs(dyn, {}, 1, str(data))  # the entry's shape fills the dynamic dims
    assert one["IMAGE"].shape == (1, 3, 2, 2) and one["TEXT"].tolist() == [[b"a", b"bc"]]

    for document, message in [
        ({"data": [{"IMAGE": [1, 2, 3]}]}, "no data for input 'TEXT'"),
        ({"data": [{"IMAGE": [1], "TEXT": ["a", "b"], "EXTRA": [1]}]}, "EXTRA"),
        ({"inputs": []}, "expected"),
        ({"data": [{"IMAGE": {"content": [1, 2, 3], "shape": [3, 2, 2]}, "TEXT": ["a", "b"]}]}, "do not fill"),
    ]:
        data.write_text(json.dumps(document))
        with pytest.raises(InputError, match=message):
            build_inputs(dyn, {}, 1, str(data))
    with pytest.raises(InputError, match="--input-data"):
        build_inputs(dyn, {}, 1, str(tmp_path / "missing.json"))


def test_encoded_bodies_decode_with_the_servers_own_codecs():
    model = model_info(DYN_META, {"max_batch_size": 8})
    (tensors,) = build_inputs(model, parse_shape_options(["IMAGE:3,2,2"]), 2, "random")
    body, hlen = http_body(model, tensors, binary=True)
    request, fmt = rest.decode_request(body, hlen, "dyn")
    assert np.array_equal(request.inputs["IMAGE"], tensors["IMAGE"])
    assert request.inputs["TEXT"].tolist() == tensors["TEXT"].tolist()
    assert fmt.is_binary("OUT")
    body, hlen = http_body(model, tensors, binary=False)
    assert hlen is None
    request, fmt = rest.decode_request(body, None, "dyn")
    assert np.array_equal(request.inputs["IMAGE"], tensors["IMAGE"]) and not fmt.is_binary("OUT")
    encoded = encode_tensors(model, tensors)
    message = pb.ModelInferRequest.FromString(grpc_infer_request(
        "dyn", "1", [(e.name, e.datatype, e.shape, e.raw) for e in encoded], ["OUT"]))
    assert message.model_name == "dyn" and message.model_version == "1"
    assert [o.name for o in message.outputs] == ["OUT"]
    assert [(t.name, t.datatype, list(t.shape)) for t in message.inputs] == [
        ("IMAGE", "UINT8", [2, 3, 2, 2]), ("TEXT", "BYTES", [2, 2])]
    image = np.frombuffer(message.raw_input_contents[0], dtype=np.uint8).reshape(2, 3, 2, 2)
    assert np.array_equal(image, tensors["IMAGE"])
    # BYTES: 4-byte little-endian length, then the bytes, per element
    text = message.raw_input_contents[1]
    first = tensors["TEXT"].reshape(-1)[0]
    assert text[:4] == len(first).to_bytes(4, "little") and text[4:4 + len(first)] == first


# --------------------------------------------------------------------------------------
# Engine against tiny in-process servers: errors never crash a run
# --------------------------------------------------------------------------------------


async def _level_against(handler_response: bytes | None, spec: LevelSpec) -> tuple:
    """One level (200 ms windows, at most 3) against an asyncio server answering ``handler_response``
    to every request, or against a closed port when it is None."""
    server = None
    if handler_response is not None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                    writer.write(handler_response)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens here once the socket is closed
    config = GeneratorConfig(protocol="http", host="127.0.0.1", port=port, model="m", version="",
                             requests=[b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"],
                             interval=0.2, max_trials=3, timeout=5)
    generator = LoadGenerator(config)
    seen: list[str] = []
    controller = Controller(generator, EngineSettings(batch_size=1, interval=0.2, max_trials=3),
                            on_window=lambda spec, windows, status: seen.append(status))
    try:
        return await controller.run_level(spec), seen
    finally:
        await generator.close()
        if server is not None:
            server.close()
            await server.wait_closed()


def test_a_level_whose_requests_all_fail_ends_early_with_the_first_error():
    body = b'{"error":"model is sad"}'
    response = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    result, seen = asyncio.run(_level_against(response, LevelSpec("concurrency", 2)))
    assert result.status == "failed" and seen == ["failed"]  # after the first window
    assert result.completed == 0 and result.errors > 0 and result.total_errors >= result.errors
    assert result.first_error == "HTTP 500: model is sad"
    assert result.total_sent == result.total_errors


def test_connection_refused_is_counted_not_raised():
    result, _ = asyncio.run(_level_against(None, LevelSpec("rate", 50.0)))
    assert result.status == "failed" and result.total_completed == 0 and result.total_errors > 0
    assert "Connect" in result.first_error or "refused" in result.first_error.lower()


def test_open_loop_against_a_fixed_response():
    body = b"{}"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body
    result, seen = asyncio.run(_level_against(ok, LevelSpec("rate", 200.0)))
    assert result.status in ("stable", "unstable") and len(seen) <= 3
    assert result.errors == 0 and result.completed > 0 and result.total_sent == result.total_completed
    assert result.send_rate > 0 and result.late >= 0 and result.avg_send_delay_us is not None


async def _plain_kserve_server() -> tuple[asyncio.AbstractServer, int]:
    """A KServe v2 server without Triton's extensions: metadata and infer only (404 otherwise)."""
    metadata = json.dumps({"name": "plain", "versions": ["1"], "platform": "x",
                           "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
                           "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, 4]}]}).encode()
    answer = b'{"model_name":"plain","outputs":[{"name":"Y","datatype":"FP32","shape":[1,4],"data":[0,0,0,0]}]}'

    def response(status: str, body: bytes) -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ")[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if method == b"GET" and path == b"/v2/models/plain":
                    writer.write(response("200 OK", metadata))
                elif method == b"POST" and path == b"/v2/models/plain/infer":
                    writer.write(response("200 OK", answer))
                else:
                    writer.write(response("404 Not Found", b'{"error":"not found"}'))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_perf_against_a_server_without_statistics_or_config(tmp_path: Path):
    from rich.console import Console

    async def main() -> tuple[int, dict]:
        server, port = await _plain_kserve_server()
        try:
            settings = runner.PerfSettings(model="plain", url=f"127.0.0.1:{port}", batch_size=2,
                                           concurrency_range="2", measurement_interval_ms=200, max_trials=3,
                                           csv=tmp_path / "plain.csv")
            out, err = Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), width=200)
            code, document = await runner._run(settings, out, err)
            assert "no statistics extension" in " ".join(err.file.getvalue().split())
            return code, document
        finally:
            server.close()
            await server.wait_closed()

    code, doc = asyncio.run(main())
    assert code == 0 and doc["server_statistics"] is False
    assert doc["model"]["max_batch_size"] is None  # no config: the leading -1 is the batch dimension
    (level,) = doc["levels"]
    assert level["batch_size"] == 2 and level["completed"] > 0 and level["errors"] == 0
    assert level["server"] is None and level["server_total"] is None
    with open(tmp_path / "plain.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["Server Queue"] == "" and float(row["Inferences/Second"]) > 0


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def _result(value: int, latencies_us: list[int]) -> object:
    window = Window(index=0, duration=1.0, sent=len(latencies_us), ok=len(latencies_us),
                    latencies_ns=np.asarray(latencies_us, dtype=np.int64) * 1000)
    return summarize_level(LevelSpec("concurrency", value), 1, "stable", [window],
                           Totals(len(latencies_us), len(latencies_us)), None, 95)


def test_csv_and_plot_from_results(tmp_path: Path):
    results = [_result(1, [100, 200, 300]), _result(4, [400, 500, 600, 700])]
    report.write_csv(tmp_path / "r.csv", results)
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["Concurrency"] for row in rows] == ["1", "4"]
    assert [float(row["Inferences/Second"]) for row in rows] == [3.0, 4.0]
    assert rows[0]["p50 latency"] == "200.0" and rows[0]["Server Queue"] == ""  # no statistics: empty
    pytest.importorskip("matplotlib")
    report.write_plot(tmp_path / "curve.png", results, "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(report, "plot_available", lambda: False)
    with pytest.raises(PerfSetupError, match=r"inferstack\[perf\]"):
        runner._check(runner.PerfSettings(model="m", plot=tmp_path / "p.png"))


# --------------------------------------------------------------------------------------
# The command against the session server
# --------------------------------------------------------------------------------------


def _success_count(server, model: str) -> int:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=30).json()
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"])


def perf(tmp_path: Path, *args: str, expect: int = 0) -> tuple[dict, list[dict], str]:
    out_json, out_csv = tmp_path / "perf.json", tmp_path / "perf.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "inferstack", "perf", "--measurement-interval", "300", "--max-trials", "3",
         "--json", str(out_json), "-f", str(out_csv), *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, output
    if expect != 0:
        return {}, [], output
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads(out_json.read_text()), rows, output


def check_levels(doc: dict, rows: list[dict], key: str, values: list[float], batch: int) -> None:
    levels = doc["levels"]
    assert [level["value"] for level in levels] == values
    assert [float(row[key]) for row in rows] == values
    for level, row in zip(levels, rows):
        assert level["status"] in ("stable", "unstable")
        assert level["throughput"] > 0 and level["errors"] == 0 and level["total_errors"] == 0
        assert level["first_error"] is None and row["First Error"] == ""
        assert level["batch_size"] == batch
        # infer/s = completed requests x batch size over the measured seconds
        assert level["throughput"] == pytest.approx(level["completed"] * batch / level["duration_s"])
        assert float(row["Inferences/Second"]) == pytest.approx(level["throughput"], rel=1e-3)
        lat = level["latency_us"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 1 <= level["measured_windows"] <= 3 and len(level["windows"]) <= 3
        assert level["total_sent"] == level["total_completed"] >= level["completed"]
        # The server counted exactly what this level sent (statistics read before and after it).
        server_total = level["server_total"]
        assert server_total["success_count"] == level["total_completed"]
        assert server_total["inference_count"] == level["total_completed"] * batch
        assert server_total["fail_count"] == 0
        split = level["server"]
        assert split is not None and split["queue_us"] >= 0 and split["compute_infer_us"] > 0


def test_perf_http_binary_concurrency(server, tmp_path: Path):
    before = _success_count(server, "mlp")
    doc, rows, output = perf(tmp_path, "-m", "mlp", "-u", server.url, "--concurrency-range", "1:2")
    after = _success_count(server, "mlp")
    check_levels(doc, rows, "Concurrency", [1, 2], 1)
    assert after - before == sum(level["total_completed"] for level in doc["levels"])
    assert doc["model"]["max_batch_size"] == 64 and doc["server_statistics"] is True
    assert "infer/s" in output and "p95 ms" in output


def test_perf_http_json_with_batches(server, tmp_path: Path):
    doc, rows, _ = perf(tmp_path, "-m", "mlp", "-u", server.url.removeprefix("http://"), "--no-binary",
                        "-b", "2", "--concurrency-range", "1:2", "--input-data", "zero", "--percentile", "97.5")
    check_levels(doc, rows, "Concurrency", [1, 2], 2)
    assert doc["settings"]["binary"] is False
    assert "p97.5 latency" in rows[0] and doc["levels"][0]["latency_us"]["p97.5"] > 0


def test_perf_grpc(server, tmp_path: Path):
    before = _success_count(server, "mlp")
    doc, rows, _ = perf(tmp_path, "-m", "mlp", "-u", server.grpc_url, "-i", "grpc", "--concurrency-range", "1:2")
    check_levels(doc, rows, "Concurrency", [1, 2], 1)
    assert _success_count(server, "mlp") - before == sum(level["total_completed"] for level in doc["levels"])


def test_perf_request_rate_poisson(server, tmp_path: Path):
    doc, rows, output = perf(tmp_path, "-m", "mlp", "-u", server.url, "--request-rate-range", "100:200:100",
                             "--distribution", "poisson")
    check_levels(doc, rows, "Request Rate", [100.0, 200.0], 1)
    for level, row in zip(doc["levels"], rows):
        assert level["mode"] == "rate" and level["send_rate"] > 0 and level["late"] >= 0
        assert int(row["Late Requests"]) == level["late"]
    assert "achieved req/s" in output


def test_perf_workers_and_dynamic_shapes(server, tmp_path: Path):
    doc, rows, _ = perf(tmp_path, "-m", "identity_bytes", "-u", server.url, "--shape", "INPUT0:3",
                        "--concurrency-range", "2", "--workers", "2")
    check_levels(doc, rows, "Concurrency", [2], 1)
    assert doc["settings"]["workers"] == 2


def test_perf_setup_errors_are_messages_not_tracebacks(server, tmp_path: Path):
    _, _, output = perf(tmp_path, "-m", "identity_bytes", "-u", server.url, expect=1)
    assert "--shape INPUT0:1" in output and "Traceback" not in output
    _, _, output = perf(tmp_path, "-m", "no_such_model", "-u", server.url, expect=1)
    assert "no_such_model" in output and "Traceback" not in output
