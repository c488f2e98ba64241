"""The response cache: the LRU and its key on their own, then through a real server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferstack.serving.cache import (
    CacheConfigError,
    LocalResponseCache,
    create_cache,
    request_key,
)
from inferstack.testing import onnx_models
from inferstack.testing.onnx_models import mlp_reference
from tests.support import MLP_CONFIG, ServerProcess

TIMEOUT = 60.0


def run(coro):
    return asyncio.run(coro)


# -- the key ---------------------------------------------------------------------------------


def test_key_covers_everything_that_decides_the_answer() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = np.ones(3, dtype=np.int64)
    base = request_key("m", 1, {"X": x, "Y": y}, ["OUT"])
    assert len(base) == 32
    assert request_key("m", 1, {"Y": y, "X": x}, ["OUT"]) == base  # input order does not matter
    assert request_key("m", 1, {"X": x.copy(), "Y": y.copy()}, ["OUT"]) == base
    # A non-contiguous view hashes like its contiguous copy.
    wide = np.zeros((2, 8), dtype=np.float32)
    wide[:, ::2] = x
    assert not wide[:, ::2].flags.c_contiguous
    assert request_key("m", 1, {"X": wide[:, ::2], "Y": y}, ["OUT"]) == base
    different = [
        request_key("n", 1, {"X": x, "Y": y}, ["OUT"]),                       # model
        request_key("m", 2, {"X": x, "Y": y}, ["OUT"]),                       # version
        request_key("m", 1, {"X2": x, "Y": y}, ["OUT"]),                      # input name
        request_key("m", 1, {"X": x.view(np.int32), "Y": y}, ["OUT"]),        # datatype, same bytes
        request_key("m", 1, {"X": x.reshape(4, 2), "Y": y}, ["OUT"]),         # shape, same bytes
        request_key("m", 1, {"X": x + 1, "Y": y}, ["OUT"]),                   # data
        request_key("m", 1, {"X": x, "Y": y}, ["OUT", "OUT2"]),               # requested outputs
        request_key("m", 1, {"X": x, "Y": y}, ["OUT2", "OUT"]),               # ... and their order
        request_key("m", 1, {"X": x}, ["OUT"]),
    ]
    assert len({base, *different}) == len(different) + 1


def test_key_of_bytes_and_bool_tensors() -> None:
    a = np.array([b"ab", b"c"], dtype=np.object_)
    b = np.array([b"a", b"bc"], dtype=np.object_)  # same concatenation, different elements
    assert request_key("m", 1, {"S": a}, []) != request_key("m", 1, {"S": b}, [])
    assert request_key("m", 1, {"S": a}, []) == request_key("m", 1, {"S": a.copy()}, [])
    flags = np.array([True, False])
    assert request_key("m", 1, {"B": flags}, []) != request_key("m", 1, {"B": ~flags}, [])
    assert request_key("m", 1, {"E": np.zeros((0, 4), np.float32)}, []) != request_key(
        "m", 1, {"E": np.zeros((4, 0), np.float32)}, [])


# -- the LRU ---------------------------------------------------------------------------------


def _entry_size(key: bytes, outputs: dict[str, np.ndarray]) -> int:
    return len(key) + sum(len(name) + array.nbytes for name, array in outputs.items())


def test_get_returns_frozen_copies() -> None:
    cache = LocalResponseCache(1 << 20)
    out = np.arange(10, dtype=np.float32)
    assert run(cache.get(b"k" * 32)) is None
    assert run(cache.put(b"k" * 32, {"OUT": out}))
    out[0] = 99.0  # the caller's array changes after the put ...
    got = run(cache.get(b"k" * 32))
    assert got["OUT"][0] == 0.0  # ... the cached copy does not
    assert not got["OUT"].flags.writeable
    with pytest.raises(ValueError):
        got["OUT"][1] = 5.0
    got["EXTRA"] = out  # a hit gets its own dict
    assert list(run(cache.get(b"k" * 32))) == ["OUT"]
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 2, 1)
    assert stats.bytes == 32 + 3 + 40


def test_lru_eviction_by_bytes() -> None:
    outputs = {"OUT": np.zeros(25, dtype=np.float32)}  # 100 bytes of data
    size = _entry_size(b"a" * 32, outputs)  # 135 bytes per entry
    cache = LocalResponseCache(3 * size)
    for key in (b"a", b"b", b"c"):
        assert run(cache.put(key * 32, outputs))
    assert cache.stats().bytes == 3 * size
    assert run(cache.get(b"a" * 32)) is not None  # a is now the most recently used
    run(cache.put(b"d" * 32, outputs))  # evicts b, the least recently used
    assert run(cache.get(b"b" * 32)) is None
    assert all(run(cache.get(key * 32)) is not None for key in (b"a", b"c", b"d"))
    # A bigger entry evicts as many as it needs.
    big = {"OUT": np.zeros(50, dtype=np.float32)}
    run(cache.put(b"e" * 32, big))
    stats = cache.stats()
    assert stats.entries == 2 and stats.evictions == 3
    assert stats.bytes == size + _entry_size(b"e" * 32, big) <= stats.capacity_bytes
    # Storing the same key again replaces it without counting it twice.
    run(cache.put(b"e" * 32, outputs))
    assert cache.stats().bytes == 2 * size
    # An entry bigger than the whole cache is not stored (and evicts nothing).
    assert not run(cache.put(b"f" * 32, {"OUT": np.zeros(1000, dtype=np.float32)}))
    assert cache.stats().entries == 2


def test_bytes_outputs_are_counted_by_their_serialized_size() -> None:
    cache = LocalResponseCache(1000)
    run(cache.put(b"k" * 32, {"S": np.array([b"abc", b""], dtype=np.object_)}))
    assert cache.stats().bytes == 32 + 1 + (4 + 3) + (4 + 0)
    assert run(cache.get(b"k" * 32))["S"].tolist() == [b"abc", b""]


def test_cache_config_syntax() -> None:
    assert create_cache([]) is None
    cache = create_cache(["local,size=1048576"])
    assert cache.stats().capacity_bytes == 1048576
    for spec, message in [
        ("local", "expected <cache>,<key>=<value>"),
        ("local,size", "expected <cache>,<key>=<value>"),
        ("memcached,host=x", "unknown cache 'memcached'"),
        ("local,size=1k", "not a whole number of bytes"),
        ("local,size=0", "must be positive"),
        ("local,capacity=5", "unknown setting"),
    ]:
        with pytest.raises(CacheConfigError, match=message):
            create_cache([spec])
    with pytest.raises(CacheConfigError, match="two caches"):
        create_cache(["local,size=10", "redis,size=10"])


# -- through the server ------------------------------------------------------------------------


CACHED_MLP = MLP_CONFIG.replace('name: "mlp"', 'name: "cached"') + "response_cache { enable: true }\n"
# An mlp batch-1 entry: 32-byte key + "OUTPUT0" + 10 FP32 = 79 bytes; two fit in 200.
CACHE_SIZE = 200


@pytest.fixture(scope="module")
def cache_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache_repository")
    onnx_models.write_model(root, "cached", onnx_models.mlp(), CACHED_MLP)
    onnx_models.write_model(root, "mlp", onnx_models.mlp(), MLP_CONFIG)
    return root


@pytest.fixture(scope="module")
def cache_server(cache_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("logs") / "cache_server.log"
    process = ServerProcess(cache_repository, "--cache-config", f"local,size={CACHE_SIZE}", log_path=log_path)
    yield process
    process.stop()


def _infer(http: httpx.Client, model: str, x: np.ndarray) -> dict:
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    response = http.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _stats(http: httpx.Client, model: str) -> dict:
    entry = http.get(f"/v2/models/{model}/stats").json()["model_stats"][0]
    inference = entry["inference_stats"]
    return {
        "executions": entry["execution_count"],
        "inferences": entry["inference_count"],
        "success": inference["success"]["count"],
        "hits": inference["cache_hit"]["count"],
        "misses": inference["cache_miss"]["count"],
        "hit_ns": inference["cache_hit"]["ns"],
        "miss_ns": inference["cache_miss"]["ns"],
    }


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_identical_requests_are_answered_from_the_cache(cache_server: ServerProcess) -> None:
    rng = np.random.default_rng(7)
    x, y, z = (rng.standard_normal((1, 64)).astype(np.float32) for _ in range(3))
    with httpx.Client(base_url=cache_server.url, timeout=TIMEOUT) as http:
        first = _infer(http, "cached", x)
        assert _stats(http, "cached") | {"hit_ns": 0, "miss_ns": 0} == {
            "executions": 1, "inferences": 1, "success": 1, "hits": 0, "misses": 1, "hit_ns": 0, "miss_ns": 0}
        second = _infer(http, "cached", x)
        assert second == first  # the very same outputs, bit for bit through JSON
        np.testing.assert_allclose(np.array(second["outputs"][0]["data"]).reshape(1, 10),
                                   mlp_reference(x), rtol=1e-4, atol=1e-5)
        stats = _stats(http, "cached")
        assert (stats["executions"], stats["inferences"], stats["success"]) == (1, 1, 2)  # the model did not run
        assert (stats["hits"], stats["misses"]) == (1, 1)
        assert stats["hit_ns"] > 0 and stats["miss_ns"] > 0

        _infer(http, "cached", y)  # a different input misses and runs
        stats = _stats(http, "cached")
        assert (stats["executions"], stats["hits"], stats["misses"]) == (2, 1, 2)

        # Two entries fill the 200-byte cache: z evicts x (y was used after x).
        _infer(http, "cached", z)
        assert _infer(http, "cached", x) == first  # x again: evicted, so computed again
        stats = _stats(http, "cached")
        assert (stats["executions"], stats["hits"], stats["misses"]) == (4, 1, 4)

        # A model that does not enable the cache never uses it.
        _infer(http, "mlp", x)
        _infer(http, "mlp", x)
        stats = _stats(http, "mlp")
        assert (stats["executions"], stats["hits"], stats["misses"]) == (2, 0, 0)

        metrics = httpx.get(cache_server.metrics_url, timeout=TIMEOUT).text
        labels = '{model="cached",version="1"}'
        assert _metric(metrics, "inferstack_cache_hits_total", labels) == 1
        assert _metric(metrics, "inferstack_cache_misses_total", labels) == 4
        assert 'inferstack_cache_hits_total{model="mlp"' not in metrics
        assert _metric(metrics, "inferstack_cache_entries") == 2
        assert _metric(metrics, "inferstack_cache_bytes") == 2 * 79
        assert _metric(metrics, "inferstack_cache_capacity_bytes") == CACHE_SIZE
        assert _metric(metrics, "inferstack_cache_evictions_total") == 2


def test_enabled_without_a_server_cache_warns_once_and_runs(cache_repository: Path, start_server) -> None:
    server = start_server(cache_repository)
    x = np.ones((1, 64), dtype=np.float32)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        _infer(http, "cached", x)
        _infer(http, "cached", x)
        stats = _stats(http, "cached")
        assert (stats["executions"], stats["hits"], stats["misses"]) == (2, 0, 0)
        assert "inferstack_cache" not in httpx.get(server.metrics_url, timeout=TIMEOUT).text
    log = server.log()
    assert log.count("model cached enables response_cache, but the server has no cache") == 1
    assert "response_cache ignored" not in log
