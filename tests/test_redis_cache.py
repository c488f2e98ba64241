"""The Redis response cache: its value format, a real Redis, an unreachable one, and two servers sharing one."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from inferstack.serving.cache import CacheConfigError, create_cache, request_key
from inferstack.serving.redis_cache import RedisResponseCache, decode_outputs, encode_outputs
from inferstack.testing import onnx_models
from inferstack.testing.onnx_models import mlp_reference
from tests.jobs_support import CACHED_CONFIG, RedisServer, redis_url  # noqa: F401 - fixtures
from tests.support import free_port


def run(coro):
    return asyncio.run(coro)


def test_value_format_round_trips_every_datatype() -> None:
    outputs = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f16": np.array([1.5, -2], dtype=np.float16),
        "i64": np.array([[-(2**62), 7]], dtype=np.int64),
        "u8": np.zeros((0, 3), dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "text": np.array([[b"ab", b""], [b"\xff\x00", b"z" * 300]], dtype=np.object_),
        "scalarish": np.array(3.25, dtype=np.float64),
    }
    decoded = decode_outputs(encode_outputs(outputs))
    assert list(decoded) == list(outputs)
    for name, array in outputs.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape, name
        assert np.array_equal(decoded[name], array), name
        assert not decoded[name].flags.writeable
    with pytest.raises(ValueError):
        decode_outputs(b"XYZ" + encode_outputs(outputs)[3:])
    with pytest.raises(ValueError):
        decode_outputs(encode_outputs(outputs) + b"!")


def test_redis_cache_get_put_ttl_and_bound(redis_url: str) -> None:  # noqa: F811
    async def main():
        cache = RedisResponseCache(redis_url, ttl=0.4, max_entry_bytes=1000, prefix=f"test:cache:{time.time_ns()}:")
        key = request_key("m", "1@abc", {"X": np.ones(4, np.float32)}, ["Y"])
        out = {"Y": np.arange(10, dtype=np.float32)}
        assert await cache.get(key) is None
        assert await cache.put(key, out)
        got = await cache.get(key)
        assert np.array_equal(got["Y"], out["Y"])
        assert not await cache.put(b"big" + key, {"Y": np.zeros(1000, np.float32)})  # over max_entry_bytes
        assert await cache.get(b"big" + key) is None
        await asyncio.sleep(0.6)
        assert await cache.get(key) is None  # expired
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.errors, stats.entries) == (1, 3, 0, 1)
        await cache.client.aclose()

    run(main())


def test_unreachable_redis_is_bypassed_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main():
        cache = RedisResponseCache(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, retry_after=0.3)
        key = b"k" * 32
        started = time.monotonic()
        for _ in range(20):
            assert await cache.get(key) is None
            assert not await cache.put(key, {"Y": np.ones(2, np.float32)})
        assert time.monotonic() - started < 5  # bypassed after the first failure, not 40 timeouts
        assert cache.stats().errors == 1
        await asyncio.sleep(0.35)
        assert await cache.get(key) is None  # tried again after retry_after, failed again
        assert cache.stats().errors == 2
        await cache.client.aclose()

    with caplog.at_level(logging.WARNING, logger="inferstack.cache"):
        run(main())
    warnings = [r for r in caplog.records if "bypassing the cache" in r.getMessage()]
    assert len(warnings) == 1


def test_create_cache_redis_settings() -> None:
    cache = create_cache(["redis,url=redis://127.0.0.1:1/0", "redis,ttl=30", "redis,max_entry_bytes=4096"])
    assert isinstance(cache, RedisResponseCache) and cache.ttl == 30 and cache.max_entry_bytes == 4096
    for specs, message in [
        (["redis,ttl=5"], "url must be redis://"),
        (["redis,url=http://x"], "url must be redis://"),
        (["redis,url=redis://x", "redis,ttl=soon"], "ttl 'soon' is not a number"),
        (["redis,url=redis://x", "redis,ttl=0"], "ttl must be positive"),
        (["redis,url=redis://x", "redis,size=10"], "unknown setting(s) size"),
        (["redis,url=redis://x", "local,size=10"], "names two caches"),
    ]:
        with pytest.raises(CacheConfigError, match=re.escape(message)):
            create_cache(specs)


def _stats(server, model: str = "cached") -> dict:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    return stats["inference_stats"]


def test_two_servers_share_the_cache_and_survive_redis_down(tmp_path: Path, start_server) -> None:
    repository = tmp_path / "repository"
    onnx_models.write_model(repository, "cached", onnx_models.mlp(), CACHED_CONFIG)
    redis_server = RedisServer(tmp_path / "redis.log")
    try:
        spec = f"redis,url={redis_server.url},ttl=60"
        first = start_server(repository, "--cache-config", spec)
        second = start_server(repository, "--cache-config", spec, "--cache-config", "redis,timeout=0.2")
        x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
        body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [3, 64], "datatype": "FP32",
                                         "data": x.ravel().tolist()}]})
        expected = mlp_reference(x)

        def infer(server) -> np.ndarray:
            response = httpx.post(f"{server.url}/v2/models/cached/infer", content=body, timeout=30)
            assert response.status_code == 200, response.text
            out = response.json()["outputs"][0]
            return np.asarray(out["data"], np.float32).reshape(out["shape"])

        np.testing.assert_allclose(infer(first), expected, rtol=1e-4, atol=1e-5)
        assert _stats(first)["cache_miss"]["count"] == 1
        # The other replica answers the same request from the entry the first one stored.
        np.testing.assert_allclose(infer(second), expected, rtol=1e-4, atol=1e-5)
        assert _stats(second)["cache_hit"]["count"] == 1 and _stats(second)["cache_miss"]["count"] == 0
        assert _stats(second)["success"]["count"] == 1

        redis_server.stop()
        for _ in range(3):  # Redis gone: still served, from the model
            np.testing.assert_allclose(infer(second), expected, rtol=1e-4, atol=1e-5)
        assert _stats(second)["success"]["count"] == 4
        metrics = httpx.get(second.metrics_url, timeout=10).text
        errors = float(re.search(r"^inferstack_cache_errors_total (\S+)$", metrics, re.MULTILINE).group(1))
        assert errors >= 1
        log = second.log()
        assert log.count("bypassing the cache") == 1, log
    finally:
        redis_server.stop()
