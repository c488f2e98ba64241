"""The gateway over 3 real replicas: failover, canary, sticky A/B, shadow, load-aware choice, admin API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from inferstack.testing import onnx_models
from tests.gateway_support import (
    ADMIN_TOKEN,
    GatewayProcess,
    Replica,
    blast,
    build_replica_repository,
    infer_body,
    output0,
    sha256,
)
from tests.support import SLOW_CONFIG

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def replicas(workdir: Path) -> Iterator[list[Replica]]:
    """Replicas A and B (fast 'work') and C (slow 'work'); started in parallel."""
    fast = build_replica_repository(workdir / "repo_fast")
    slow = build_replica_repository(workdir / "repo_slow", slow_work=True)
    started: list[Replica] = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(Replica, repo, log_path=workdir / f"replica{i}.log")
                   for i, repo in enumerate((fast, fast, slow))]
        errors = []
        for future in futures:
            try:
                started.append(future.result())
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    holder = list(started)
    try:
        if errors:
            raise errors[0]
        yield holder
    finally:
        for replica in holder:
            replica.stop()


@pytest.fixture(scope="module")
def gateway(replicas: list[Replica], workdir: Path) -> Iterator[GatewayProcess]:
    config = {
        "replicas": {"static": [r.spec for r in replicas]},
        "routing": {"breaker_open_s": 1.0, "retry_budget_min_per_s": 20},
        "admin": {"tokens_sha256": [sha256(ADMIN_TOKEN)]},
        "state_file": str(workdir / "gateway.state.json"),
    }
    process = GatewayProcess(config, workdir)
    try:
        for model in ("mlp", "versioned", "model_a", "model_b", "work"):
            process.wait(f"/v2/models/{model}/ready")
        yield process
    finally:
        process.stop()


def _replica_states(gateway: GatewayProcess) -> dict[str, dict]:
    rows = httpx.get(gateway.url + "/admin/v1/replicas", headers=ADMIN, timeout=10).json()
    return {row["http"]: row for row in rows}


def _put_policy(gateway: GatewayProcess, model: str, policy: dict | None) -> httpx.Response:
    if policy is None:
        return httpx.delete(f"{gateway.url}/admin/v1/policies/{model}", headers=ADMIN, timeout=10)
    return httpx.put(f"{gateway.url}/admin/v1/policies/{model}", headers=ADMIN, content=orjson.dumps(policy),
                     timeout=10)


def test_infer_through_gateway_and_errors(gateway: GatewayProcess, replicas: list[Replica]) -> None:
    response = httpx.post(gateway.url + "/v2/models/model_a/infer", content=infer_body(X),
                          headers={"x-request-id": "req-123"})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(output0(response.content), X + 10)
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-inferstack-replica"] in {r.label for r in replicas}
    # A model no replica has: 404 naming it.
    missing = httpx.post(gateway.url + "/v2/models/nope/infer", content=infer_body(X))
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    missing_version = httpx.post(gateway.url + "/v2/models/model_a/versions/7/infer", content=infer_body(X))
    assert missing_version.status_code == 404
    # Metadata and config proxied, readiness answered by the gateway; merged index.
    assert httpx.get(gateway.url + "/v2/models/mlp").json()["name"] == "mlp"
    assert httpx.get(gateway.url + "/v2/models/mlp/config").json()["max_batch_size"] == 64
    assert httpx.get(gateway.url + "/v2/models/nope/ready").status_code != 200
    index = httpx.post(gateway.url + "/v2/repository/index", content=b"{}").json()
    assert {"name": "versioned", "version": "2", "state": "READY"} in index
    # Shared memory and repository control are refused with a reason.
    refused = httpx.post(gateway.url + "/v2/repository/models/mlp/unload")
    assert refused.status_code == 400 and "gateway" in refused.json()["error"]


def test_4xx_is_never_retried(gateway: GatewayProcess) -> None:
    retries = gateway.metric("inferstack_gateway_retries_total")
    bad = np.zeros((1, 5), dtype=np.float32)  # mlp takes 64 features
    for _ in range(5):
        response = httpx.post(gateway.url + "/v2/models/mlp/infer", content=infer_body(bad))
        assert response.status_code == 400, response.text
        assert "INPUT0" in response.json()["error"]
    assert gateway.metric("inferstack_gateway_retries_total") == retries
    assert gateway.metric("inferstack_gateway_requests_total", model="mlp", code="400") >= 5


def test_tritonclient_http_and_grpc(gateway: GatewayProcess) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    expected = onnx_models.mlp_reference(x)
    client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("mlp")
    for binary in (True, False):
        inputs = [httpclient.InferInput("INPUT0", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        result = client.infer("mlp", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-4, atol=1e-5)
    assert client.get_model_metadata("mlp")["name"] == "mlp"
    client.close()

    gclient = grpcclient.InferenceServerClient(gateway.grpc_url)
    assert gclient.is_server_live() and gclient.is_server_ready() and gclient.is_model_ready("mlp")
    assert gclient.get_model_metadata("mlp").name == "mlp"
    assert gclient.get_model_config("mlp").config.max_batch_size == 64
    inputs = [grpcclient.InferInput("INPUT0", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = gclient.infer("mlp", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-4, atol=1e-5)
    # Streaming: each request routed on its own, errors in the stream.
    import queue

    answers: queue.Queue = queue.Queue()
    gclient.start_stream(callback=lambda result, error: answers.put((result, error)))
    small_stream = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
    small_stream[0].set_data_from_numpy(X)
    gclient.async_stream_infer("model_a", small_stream)
    gclient.async_stream_infer("nope", small_stream)
    first, second = answers.get(timeout=30), answers.get(timeout=30)
    gclient.stop_stream()
    np.testing.assert_array_equal(first[0].as_numpy("OUTPUT0"), X + 10)
    assert second[1] is not None and "nope" in str(second[1])
    with pytest.raises(Exception) as info:
        gclient.infer("nope", inputs)
    assert "NOT_FOUND" in str(info.value) or "no replica" in str(info.value)
    small = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
    small[0].set_data_from_numpy(X)
    # A header rule over gRPC metadata: the request is retargeted to version 2 on the wire.
    assert _put_policy(gateway, "versioned", {
        "variants": [{"name": "v1", "version": 1, "weight": 100}, {"name": "v2", "version": 2, "weight": 0}],
        "rules": [{"header": "x-canary", "equals": "true", "variant": "v2"}],
    }).status_code == 200
    try:
        plain = gclient.infer("versioned", small).as_numpy("OUTPUT0")
        canary = gclient.infer("versioned", small, headers={"x-canary": "true"}).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(plain, X + 1)
        np.testing.assert_array_equal(canary, X + 2)
    finally:
        _put_policy(gateway, "versioned", None)
    gclient.close()


def test_canary_split_within_tolerance_and_rollback(gateway: GatewayProcess) -> None:
    policy = {"variants": [{"name": "stable", "model": "versioned", "version": "1", "weight": 90},
                           {"name": "canary", "model": "versioned", "version": "2", "weight": 10}]}
    response = _put_policy(gateway, "versioned", policy)
    assert response.status_code == 200, response.text
    n = 2000
    results = asyncio.run(blast(gateway.url, "/v2/models/versioned/infer", infer_body(X), total=n, concurrency=8))
    assert [s for s, _, _ in results if s != 200] == []
    variants = Counter(h["x-inferstack-variant"] for _, h, _ in results)
    for _, headers, body in results:  # the variant named is the one that answered
        offset = 2 if headers["x-inferstack-variant"] == "canary" else 1
        np.testing.assert_array_equal(output0(body), X + offset)
    p = 0.10
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(variants["canary"] - n * p) <= 5 * sigma, variants
    assert gateway.metric("inferstack_gateway_requests_total", model="versioned", variant="canary") == \
        variants["canary"]

    # Promote to 50%, then roll back instantly to the 10% policy.
    policy["variants"][0]["weight"] = policy["variants"][1]["weight"] = 50
    assert _put_policy(gateway, "versioned", policy).status_code == 200
    rolled = httpx.post(gateway.url + "/admin/v1/policies/versioned/rollback", headers=ADMIN)
    assert rolled.status_code == 200 and rolled.json()["variants"][1]["weight"] == 10
    assert _put_policy(gateway, "versioned", None).status_code == 200
    response = httpx.post(gateway.url + "/v2/models/versioned/infer", content=infer_body(X))
    assert "x-inferstack-variant" not in response.headers


def test_policy_validation(gateway: GatewayProcess) -> None:
    bad = {"variants": [{"name": "a", "weight": 60}, {"name": "b", "version": 2, "weight": 30}]}
    response = _put_policy(gateway, "versioned", bad)
    assert response.status_code == 400 and "sum to 100" in response.json()["error"]
    ghost = {"variants": [{"name": "a", "model": "ghost", "weight": 100}]}
    response = _put_policy(gateway, "versioned", ghost)
    assert response.status_code == 400 and "policies.versioned.variants[0].model" in response.json()["error"]
    ghost_version = {"variants": [{"name": "a", "version": 9, "weight": 100}]}
    response = _put_policy(gateway, "versioned", ghost_version)
    assert response.status_code == 400 and "version" in response.json()["error"]
    rule = {"variants": [{"name": "a", "weight": 100}], "rules": [{"header": "x-c", "equals": "1", "variant": "z"}]}
    assert _put_policy(gateway, "versioned", rule).status_code == 400
    assert httpx.get(gateway.url + "/admin/v1/policies/versioned", headers=ADMIN).status_code == 404
    # The admin API has its own credential.
    assert httpx.get(gateway.url + "/admin/v1/policies").status_code == 401
    assert httpx.get(gateway.url + "/admin/v1/policies", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_sticky_ab_and_header_rule(gateway: GatewayProcess) -> None:
    policy = {"variants": [{"name": "A", "model": "model_a", "weight": 50},
                           {"name": "B", "model": "model_b", "weight": 50}],
              "sticky": {"header": "x-user-id"},
              "rules": [{"header": "x-force-b", "equals": "true", "variant": "B"}]}
    assert _put_policy(gateway, "ab", policy).status_code == 200
    try:
        seen: dict[str, str] = {}
        with httpx.Client(base_url=gateway.url) as client:
            for user in range(40):
                for _ in range(4):
                    response = client.post("/v2/models/ab/infer", content=infer_body(X),
                                           headers={"x-user-id": f"user-{user}"})
                    assert response.status_code == 200, response.text
                    variant = response.headers["x-inferstack-variant"]
                    assert seen.setdefault(f"user-{user}", variant) == variant
                    np.testing.assert_array_equal(output0(response.content), X + (10 if variant == "A" else 20))
            assert set(seen.values()) == {"A", "B"}
            user_a = next(u for u, v in seen.items() if v == "A")
            forced = client.post("/v2/models/ab/infer", content=infer_body(X),
                                 headers={"x-user-id": user_a, "x-force-b": "true"})
            assert forced.headers["x-inferstack-variant"] == "B"
            # Sticky on a request parameter (a user id in the body).
            policy["sticky"] = {"parameter": "user_id"}
            assert _put_policy(gateway, "ab", policy).status_code == 200
            for user in range(10):
                variants = {client.post("/v2/models/ab/infer",
                                        content=infer_body(X, {"user_id": user})).headers["x-inferstack-variant"]
                            for _ in range(3)}
                assert len(variants) == 1
        assert gateway.metric("inferstack_gateway_requests_total", model="ab", variant="A") > 0
    finally:
        _put_policy(gateway, "ab", None)


def test_shadow_mismatch_detected_and_never_returned(gateway: GatewayProcess) -> None:
    def shadow_counts(shadow: str) -> tuple[float, float]:
        return (gateway.metric("inferstack_gateway_shadow_requests_total", model="model_a", shadow=shadow,
                               outcome="match"),
                gateway.metric("inferstack_gateway_shadow_requests_total", model="model_a", shadow=shadow,
                               outcome="mismatch"))

    policy = {"variants": [{"name": "primary", "model": "model_a", "weight": 100}],
              "shadow": {"model": "model_b", "percent": 100}}
    assert _put_policy(gateway, "model_a", policy).status_code == 200
    try:
        for _ in range(10):
            response = httpx.post(gateway.url + "/v2/models/model_a/infer", content=infer_body(X))
            np.testing.assert_array_equal(output0(response.content), X + 10)  # never the shadow's answer
        deadline = time.monotonic() + 30
        while shadow_counts("model_b")[1] < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shadow_counts("model_b") == (0, 10)
        assert gateway.metric("inferstack_gateway_shadow_mismatches_total", model="model_a") == 10

        policy["shadow"] = {"model": "model_a_copy", "percent": 100}
        assert _put_policy(gateway, "model_a", policy).status_code == 200
        for _ in range(5):
            httpx.post(gateway.url + "/v2/models/model_a/infer", content=infer_body(X))
        deadline = time.monotonic() + 30
        while shadow_counts("model_a_copy")[0] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shadow_counts("model_a_copy") == (5, 0)
    finally:
        _put_policy(gateway, "model_a", None)


def test_slow_replica_gets_a_smaller_share(gateway: GatewayProcess, replicas: list[Replica]) -> None:
    results = asyncio.run(blast(gateway.url, "/v2/models/work/infer", infer_body(X), total=400, concurrency=8))
    assert [s for s, _, _ in results if s != 200] == []
    shares = Counter(h["x-inferstack-replica"] for _, h, _ in results)
    fast_a, fast_b, slow = (shares[r.label] for r in replicas)
    assert slow < fast_a and slow < fast_b, shares
    assert slow < len(results) / 6, shares


def test_kill_replica_zero_failed_requests_then_readmitted(gateway: GatewayProcess, replicas: list[Replica]) -> None:
    """HTTP and gRPC clients at full speed while a replica is SIGKILLed and restarted: no client sees an error."""
    victim = replicas[0]
    marks: dict[str, bool] = {}
    results: list[tuple[int, dict[str, str], bytes]] = []
    stop = asyncio.Event()

    grpc_outcomes: list[str] = []

    async def grpc_load() -> None:
        import grpc

        from inferstack._proto import grpc_service_pb2 as pb

        request = pb.ModelInferRequest(model_name="mlp")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.ones((1, 64), dtype=np.float32).tobytes())
        data = request.SerializeToString()
        async with grpc.aio.insecure_channel(gateway.grpc_url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        await call(data, timeout=60)
                        grpc_outcomes.append("ok")
                    except grpc.aio.AioRpcError as exc:
                        grpc_outcomes.append(f"{exc.code()}: {exc.details()}")

            await asyncio.gather(*(worker() for _ in range(4)))

    async def scenario() -> None:
        body = infer_body(np.ones((1, 64), dtype=np.float32))
        load = asyncio.ensure_future(blast(gateway.url, "/v2/models/mlp/infer", body, total=10**9,
                                           concurrency=8, stop=stop))
        grpc_task = asyncio.ensure_future(grpc_load())
        await asyncio.sleep(1.0)
        victim.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = (await asyncio.to_thread(_replica_states, gateway))[victim.url]
            if not state["ready"] or state["ejected"]:
                break
            await asyncio.sleep(0.05)
        marks["ejected"] = not state["ready"] or state["ejected"]
        await asyncio.sleep(1.0)
        restarted = await asyncio.to_thread(victim.restart)
        replicas[0] = restarted
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = (await asyncio.to_thread(_replica_states, gateway))[victim.url]
            if state["ready"] and not state["ejected"]:
                break
            await asyncio.sleep(0.05)
        marks["readmitted"] = state["ready"] and not state["ejected"]
        await asyncio.sleep(1.5)
        stop.set()
        results.extend(await load)
        await grpc_task

    asyncio.run(scenario())
    failures = [(s, b[:200]) for s, _, b in results if s != 200]
    assert failures == [], failures[:5]
    assert [o for o in grpc_outcomes if o != "ok"] == [] and len(grpc_outcomes) > 50
    assert marks["ejected"] and marks["readmitted"], marks
    assert len(results) > 200
    # After readmission the restarted replica receives traffic again.
    tail = results[-200:]
    assert any(h.get("x-inferstack-replica") == victim.label for _, h, _ in tail), Counter(
        h.get("x-inferstack-replica") for _, h, _ in tail)
    assert gateway.metric("inferstack_gateway_replica_ready", replica=victim.label) == 1


def test_model_loading_somewhere_is_503_with_retry_after(gateway: GatewayProcess, workdir: Path) -> None:
    repo = workdir / "repo_loader"
    warmup = ('model_warmup [ { name: "w" batch_size: 1 count: 30 inputs { key: "INPUT0" '
              'value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]')
    onnx_models.write_model(repo, "loader", onnx_models.slow_identity(4, repeats=300),
                            SLOW_CONFIG % "max_queue_delay_microseconds: 0" + warmup)
    replica = Replica(repo, "--model-control-mode", "explicit", log_path=workdir / "loader.log")
    try:
        added = httpx.post(gateway.url + "/admin/v1/replicas", headers=ADMIN, content=orjson.dumps(
            {"replica": replica.spec}))
        assert added.status_code == 200, added.text
        deadline = time.monotonic() + 30
        while "loader" not in _replica_states(gateway)[replica.url]["models"] and time.monotonic() < deadline:
            time.sleep(0.05)
        not_loaded = httpx.post(gateway.url + "/v2/models/loader/infer", content=infer_body(X))
        assert not_loaded.status_code == 503 and "not ready" in not_loaded.json()["error"]

        loading = threading.Thread(target=lambda: httpx.post(
            replica.url + "/v2/repository/models/loader/load", timeout=120))
        loading.start()
        seen_retry_after = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = httpx.post(gateway.url + "/v2/models/loader/infer", content=infer_body(X))
            if response.status_code == 503 and "loading" in response.json()["error"]:
                seen_retry_after = response.headers.get("retry-after")
            if response.status_code == 200:
                break
            time.sleep(0.05)
        loading.join()
        assert seen_retry_after is not None and int(seen_retry_after) >= 1
        assert response.status_code == 200
        removed = httpx.request("DELETE", gateway.url + "/admin/v1/replicas", headers=ADMIN,
                                content=orjson.dumps({"replica": replica.url}))
        assert removed.status_code == 200
        assert replica.url not in _replica_states(gateway)
        assert httpx.post(gateway.url + "/v2/models/loader/infer", content=infer_body(X)).status_code == 404
    finally:
        replica.stop()


def test_admin_changes_persist_across_restart_and_dns_discovery(replicas: list[Replica], workdir: Path) -> None:
    r = replicas[1]
    config = {
        "replicas": {"dns": [{"name": "localhost", "http_port": r.http_port, "grpc_port": r.grpc_port,
                              "metrics_port": r.metrics_port, "interval_s": 1}]},
        "admin": {"tokens_sha256": [sha256(ADMIN_TOKEN)]},
        "policies": {"model_a": {"variants": [{"name": "only", "model": "model_a", "weight": 100}]}},
    }
    gateway = GatewayProcess(config, workdir, name="persist")
    try:
        gateway.wait("/v2/models/versioned/ready")
        states = httpx.get(gateway.url + "/admin/v1/replicas", headers=ADMIN).json()
        assert any(s["source"] == "dns:localhost" and s["ready"] for s in states)
        policy = {"variants": [{"name": "old", "version": 1, "weight": 0}, {"name": "new", "version": 2, "weight": 100}]}
        assert _put_policy(gateway, "versioned", policy).status_code == 200
        assert _put_policy(gateway, "model_a", None).status_code == 200  # a config policy removed at runtime
    finally:
        assert gateway.stop() == 0
    state_file = Path(str(gateway.config_path) + ".state.json")
    assert state_file.exists()
    again = GatewayProcess(config, workdir, name="persist")
    try:
        again.wait("/v2/models/versioned/ready")
        stored = httpx.get(again.url + "/admin/v1/policies", headers=ADMIN).json()
        assert set(stored) == {"versioned"}
        assert stored["versioned"]["variants"][1]["weight"] == 100
        response = httpx.post(again.url + "/v2/models/versioned/infer", content=infer_body(X))
        assert response.headers["x-inferstack-variant"] == "new"
        np.testing.assert_array_equal(output0(response.content), X + 2)
    finally:
        again.stop()
