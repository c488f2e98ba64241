"""A response cache in Redis, shared by every replica (``--cache-config redis,url=...``).

Same three calls as the local LRU (``get``/``put``/``stats``), and the same
keys (:func:`~inferstack.serving.cache.request_key`), except that the model
version part of the key is a content fingerprint of the model (its config
and file bytes) rather than a per-process load id, so two replicas serving
the same model compute the same key, and a model whose files change never
reads the entries of the copy it replaced.

Values are bounded (``max_entry_bytes``; larger responses are not stored)
and expire after ``ttl`` seconds. The cache can never fail a request: any
Redis error (down, timeout, full) is counted, logged once per outage, and
the request runs the model as if the cache were empty. After an error the
cache is bypassed for ``retry_after`` seconds, so an outage costs one
timeout, not one per request.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from inferstack.core.datatypes import datatype_of, deserialize_bytes_tensor, numpy_dtype, serialize_bytes_tensor
from inferstack.serving.cache import CacheConfigError, CacheStats

log = logging.getLogger("inferstack.cache")

_HEADER = struct.Struct("<I")
_VERSION = b"IS1"


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """``IS1`` + u32 header length + JSON [[name, datatype, shape, nbytes], ...] + the tensors' bytes."""
    meta: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        datatype = datatype_of(array)
        raw = serialize_bytes_tensor(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
        meta.append([name, datatype, list(array.shape), len(raw)])
        chunks.append(raw)
    header = orjson.dumps(meta)
    return b"".join((_VERSION, _HEADER.pack(len(header)), header, *chunks))


def decode_outputs(value: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`encode_outputs`; read-only arrays viewing ``value``."""
    if value[:3] != _VERSION:
        raise ValueError("not an inferstack cache entry")
    (length,) = _HEADER.unpack_from(value, 3)
    offset = 3 + _HEADER.size
    meta = orjson.loads(value[offset : offset + length])
    offset += length
    view = memoryview(value)
    outputs: dict[str, np.ndarray] = {}
    for name, datatype, shape, size in meta:
        chunk = view[offset : offset + size]
        offset += size
        count = int(np.prod(shape)) if shape else 1
        if datatype == "BYTES":
            array = deserialize_bytes_tensor(chunk, count, name).reshape(shape)
        else:
            array = np.frombuffer(chunk, dtype=numpy_dtype(datatype)).reshape(shape)
        array.flags.writeable = False
        outputs[name] = array
    if offset != len(value):
        raise ValueError("cache entry has trailing bytes")
    return outputs


def model_fingerprint(config: Any, model_path: Path) -> str:
    """BLAKE2b of the model's config and file bytes: equal on every replica serving the same model."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(config.SerializeToString(deterministic=True))
    paths = sorted(p for p in model_path.rglob("*") if p.is_file()) if model_path.is_dir() else [model_path]
    for path in paths:
        hasher.update(str(path.relative_to(model_path) if model_path.is_dir() else path.name).encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
    return hasher.hexdigest()


class RedisResponseCache:
    """Shared cache in Redis; never raises into the serving path."""

    #: Tells ModelVersion to key entries by model content, not by a per-process load id.
    shared = True

    def __init__(self, url: str, *, ttl: float = 3600.0, max_entry_bytes: int = 1 << 20,
                 prefix: str = "inferstack:cache:", timeout: float = 0.25, retry_after: float = 5.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise CacheConfigError("--cache-config redis needs redis-py: pip install 'inferstack[redis]'") from exc
        self.url = url
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.prefix = prefix.encode()
        self.retry_after = retry_after
        self.client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        retry_on_timeout=False)
        self._hits = self._misses = self._errors = self._stored = self._stored_bytes = self._too_large = 0
        self._down_until = 0.0
        self._failing = False

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, action: str, exc: Exception) -> None:
        self._errors += 1
        self._down_until = time.monotonic() + self.retry_after
        if not self._failing:
            self._failing = True
            log.warning("response cache: Redis %s failed (%s: %s); bypassing the cache, retrying in %.0fs",
                        action, type(exc).__name__, exc, self.retry_after)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("response cache: Redis at %s reachable again", self.url)

    async def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        if not self._available():
            self._misses += 1
            return None
        try:
            value = await self.client.get(self.prefix + key.hex().encode())
        except Exception as exc:  # noqa: BLE001 - the cache must never fail a request
            self._failed("GET", exc)
            self._misses += 1
            return None
        self._recovered()
        if value is None:
            self._misses += 1
            return None
        try:
            outputs = decode_outputs(value)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("response cache: unreadable entry ignored: %s", exc)
            self._misses += 1
            return None
        self._hits += 1
        return outputs

    async def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> bool:
        value = encode_outputs(outputs)
        if len(value) > self.max_entry_bytes:
            self._too_large += 1
            return False
        if not self._available():
            return False
        try:
            await self.client.set(self.prefix + key.hex().encode(), value, px=max(1, int(self.ttl * 1000)))
        except Exception as exc:  # noqa: BLE001 - the cache must never fail a request
            self._failed("SET", exc)
            return False
        self._recovered()
        self._stored += 1
        self._stored_bytes += len(value)
        return True

    def stats(self) -> CacheStats:
        # entries/bytes: what this replica stored (Redis holds the rest; its own INFO has the totals).
        return CacheStats(entries=self._stored, bytes=self._stored_bytes, capacity_bytes=0, hits=self._hits,
                          misses=self._misses, evictions=0, errors=self._errors)


def create_redis_cache(settings: dict[str, str]) -> RedisResponseCache:
    """``redis,url=redis://host:6379/0,ttl=SECONDS[,max_entry_bytes=BYTES][,timeout=SECONDS]``."""
    known = {"url", "ttl", "max_entry_bytes", "timeout", "prefix"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise CacheConfigError(f"--cache-config redis: unknown setting(s) {', '.join(unknown)}; "
                               f"expected {', '.join(sorted(known))}")
    url = settings.get("url", "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise CacheConfigError(f"--cache-config redis: url must be redis://, rediss:// or unix://, got {url!r}")

    def number(name: str, default: float, kind: type) -> Any:
        raw = settings.get(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise CacheConfigError(f"--cache-config redis: {name} {raw!r} is not a number") from None
        if value <= 0:
            raise CacheConfigError(f"--cache-config redis: {name} must be positive, got {raw}")
        return value

    cache = RedisResponseCache(
        url, ttl=number("ttl", 3600.0, float), max_entry_bytes=number("max_entry_bytes", 1 << 20, int),
        timeout=number("timeout", 0.25, float), prefix=settings.get("prefix", "inferstack:cache:"),
    )
    log.info("response cache: Redis at %s, ttl %.0fs, entries up to %d bytes", url, cache.ttl,
             cache.max_entry_bytes)
    return cache
