"""The response cache: identical requests answered without running the model.

A model opts in with ``response_cache { enable: true }`` in its config; the
server provides the cache with ``--cache-config local,size=BYTES`` (Triton's
syntax). Without a server cache, such a model logs a warning once and runs
every request.

The interface is three calls, so another store (Redis, a later
``inferstack[redis]``) can replace the in-process LRU without touching the
callers::

    cache.get(key)  -> dict[str, ndarray] | None     (async)
    cache.put(key, outputs) -> bool                  (async; False if not stored)
    cache.stats()   -> CacheStats

The key (:func:`request_key`) is a BLAKE2b digest of everything that decides
the answer: model name and version, every input's name, datatype, shape and
bytes (inputs in name order, so their order in the request does not matter;
BYTES by their length-prefixed serialization) and the requested output names
in order. Hashing reads each buffer once; nothing walks fixed-size tensors
element by element.

Stored outputs are private, read-only copies: the arrays a response carries
may be views of a larger batch buffer or be handed on to code that mutates
them, and a hit must never see such changes. A hit returns the stored
arrays themselves (read-only, so they cannot be changed either), in a new
dict.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inferstack.core.datatypes import bytes_tensor_size, datatype_of, serialize_bytes_tensor

log = logging.getLogger("inferstack.cache")

_U64 = struct.Struct("<Q")


class CacheConfigError(ValueError):
    """A ``--cache-config`` value that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's state and lifetime counters."""

    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    #: Failed calls to the cache's store (Redis down or slow); always 0 for the local LRU.
    errors: int = 0


class ResponseCache(Protocol):
    async def get(self, key: bytes) -> dict[str, np.ndarray] | None: ...

    async def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> bool: ...

    def stats(self) -> CacheStats: ...


def _frame(hasher: hashlib._Hash, data: bytes | memoryview) -> None:
    """Length-prefix every field, so no two different requests hash the same bytes."""
    hasher.update(_U64.pack(len(data)))
    hasher.update(data)


def request_key(
    model: str, version: int | str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> bytes:
    """The cache key of a request: 32 bytes of BLAKE2b over everything that decides the answer."""
    hasher = hashlib.blake2b(digest_size=32)
    _frame(hasher, model.encode())
    _frame(hasher, str(version).encode())
    _frame(hasher, _U64.pack(len(inputs)))
    for name in sorted(inputs):
        array = inputs[name]
        datatype = datatype_of(array)
        _frame(hasher, name.encode())
        _frame(hasher, datatype.encode())
        _frame(hasher, np.asarray(array.shape, dtype="<u8").tobytes())
        if datatype == "BYTES":
            _frame(hasher, serialize_bytes_tensor(array))
        else:
            data = np.ascontiguousarray(array)  # a copy only for non-contiguous views
            _frame(hasher, data.reshape(-1).view(np.uint8).data)
    _frame(hasher, _U64.pack(len(outputs)))
    for name in outputs:
        _frame(hasher, name.encode())
    return hasher.digest()


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


def _nbytes(array: np.ndarray) -> int:
    return bytes_tensor_size(array) if array.dtype.kind in "OSU" else array.nbytes


class LocalResponseCache:
    """An in-process LRU bounded by bytes: keys, output names and output data are counted.

    Thread-safe (a lock around the dict), though the server calls it only
    from the event loop. An entry larger than the whole cache is not stored.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise CacheConfigError(f"cache size must be a positive number of bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    async def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return dict(entry[0])

    async def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> bool:
        size = len(key) + sum(len(name.encode()) + _nbytes(array) for name, array in outputs.items())
        if size > self.capacity_bytes:
            return False
        stored = {name: _frozen_copy(array) for name, array in outputs.items()}  # outside the lock
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            while self._entries and self._bytes + size > self.capacity_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._entries[key] = (stored, size)
            self._bytes += size
        return True

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )


def create_cache(specs: Sequence[str]) -> ResponseCache | None:
    """Build the server's cache from ``--cache-config`` values; None when there are none.

    Triton's syntax: ``<cache>,<key>=<value>``, repeatable to give several
    keys (``--cache-config local,size=1048576``). Only ``local`` exists here,
    with one key, ``size`` in bytes.
    """
    if not specs:
        return None
    name: str | None = None
    settings: dict[str, str] = {}
    for spec in specs:
        cache, _, setting = spec.partition(",")
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise CacheConfigError(f"--cache-config {spec!r}: expected <cache>,<key>=<value>, e.g. local,size=1048576")
        cache = cache.strip()
        if name is not None and cache != name:
            raise CacheConfigError(f"--cache-config names two caches, {name!r} and {cache!r}; use one")
        name = cache
        settings[key.strip()] = value.strip()
    if name == "redis":
        from inferstack.serving.redis_cache import create_redis_cache

        return create_redis_cache(settings)
    if name != "local":
        raise CacheConfigError(f"--cache-config: unknown cache {name!r}; expected 'local' or 'redis'")
    unknown = sorted(set(settings) - {"size"})
    if unknown:
        raise CacheConfigError(f"--cache-config local: unknown setting(s) {', '.join(unknown)}; the only one is size")
    if "size" not in settings:
        raise CacheConfigError("--cache-config local: 'size' (bytes) is required, e.g. local,size=1048576")
    try:
        size = int(settings["size"])
    except ValueError:
        raise CacheConfigError(f"--cache-config local: size {settings['size']!r} is not a whole number of bytes") from None
    if size <= 0:
        raise CacheConfigError(f"--cache-config local: size must be positive, got {size}")
    log.info("response cache: local LRU of %d bytes", size)
    return LocalResponseCache(size)
