"""Triton's system shared memory extension, shared by every transport.

A client on the same host puts tensors in a POSIX shared memory object
(``shm_open(key)``, i.e. ``/dev/shm/<key>``), registers a *region* of it
under a name, and then names that region in an input's or output's
parameters instead of sending the bytes. Inputs are read in place (a numpy
view of the mapping: no copy); outputs are copied once into the region.

The API, in the terms every transport speaks (plain names, integers,
datatype strings and shapes, so HTTP and gRPC use the same calls)::

    registry = SystemSharedMemory(enabled=True)     # one per server (server.py)
    registry.register(name, key, offset, byte_size) # 400 bad key/bounds, ALREADY_EXISTS duplicate
    registry.unregister(name)                       # "" = every region; unknown names are a no-op
    registry.status(name)                           # [{"name", "key", "offset", "byte_size"}]; 404 unknown

    ref = shared_memory_reference(parameters, "input 'INPUT0'")  # None, or (region, offset, byte_size)
    with registry.lease() as lease:                 # one per inference request
        array = lease.read_input(region, offset, byte_size, datatype, shape, tensor="INPUT0")
        lease.check_output(region, offset, byte_size, tensor="OUTPUT0")   # before running the model
        written = lease.write_output(region, offset, byte_size, array, tensor="OUTPUT0")

``offset``/``byte_size`` in ``read_input``/``write_output`` are the request's
``shared_memory_offset``/``shared_memory_byte_size``: relative to the region.
Every error is an InferenceServerError naming the region and the field:
400 for bad values, 404 for a region that is not registered.

Why a lease: a region may be unregistered while a request still reads from
or writes to it. Unregistering removes the name at once (it can be
registered again), but the mapping is closed only when the last lease using
it ends. numpy views still alive after that keep the mapping alive themselves:
``mmap.close()`` refuses while views exist, so the memory is unmapped when
the last view is garbage collected, never under a reader.

Why it is off by default (``--allow-client-shm``, as in Triton since 26.04):
a registered key can name *any* object under ``/dev/shm`` that the server's
user may open, so a remote client could read it (through an identity model)
or overwrite it (through an output). Enable it only where every client that
can reach the server is trusted with the server's shared memory.

This module lives in ``protocol`` because the REST and gRPC codecs both call
it and it needs only ``core`` and ``protocol.tensors``; unlike the rest of
the package it holds state (the registry) and does I/O (``open``/``mmap``).
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from inferstack.core.datatypes import numpy_dtype
from inferstack.core.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from inferstack.protocol.tensors import element_count, is_int, tensor_from_bytes, tensor_to_bytes

#: Where Linux keeps POSIX shared memory objects (what ``shm_open`` opens).
SHM_DIR = Path("/dev/shm")

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"

_DISABLED = (
    "client shared memory is disabled on this server; start it with --allow-client-shm "
    "(only where every client that can reach it may use the server's shared memory)"
)


class SharedMemoryRef(NamedTuple):
    """Where a tensor lives: the parameters of one input or requested output."""

    region: str
    offset: int
    byte_size: int

    def parameters(self) -> dict[str, Any]:
        """The parameters a response carries for an output written to shared memory."""
        params: dict[str, Any] = {REGION: self.region, BYTE_SIZE: self.byte_size}
        if self.offset:
            params[OFFSET] = self.offset
        return params


def shared_memory_reference(parameters: Mapping[str, Any], where: str) -> SharedMemoryRef | None:
    """The shared memory parameters of an input or output, validated; None if it has none.

    ``shared_memory_region`` and ``shared_memory_byte_size`` go together;
    ``shared_memory_offset`` is optional (default 0). ``where`` names the
    tensor in errors (``"input 'INPUT0'"``).
    """
    if REGION not in parameters and BYTE_SIZE not in parameters and OFFSET not in parameters:
        return None
    region = parameters.get(REGION)
    if not isinstance(region, str) or not region:
        raise InvalidArgumentError(
            f"{where}: '{REGION}' must be a non-empty string when '{BYTE_SIZE}' or '{OFFSET}' is given"
        )
    if BYTE_SIZE not in parameters:
        raise InvalidArgumentError(f"{where}: shared memory region {region!r} needs '{BYTE_SIZE}'")
    byte_size = parameters[BYTE_SIZE]
    offset = parameters.get(OFFSET, 0)
    for field, value in ((BYTE_SIZE, byte_size), (OFFSET, offset)):
        if not is_int(value) or value < 0:
            raise InvalidArgumentError(f"{where}: '{field}' must be a non-negative integer, got {value!r}")
    return SharedMemoryRef(region, offset, byte_size)


def _object_path(key: Any, name: str) -> Path:
    """``/dev/shm/<key>`` for a POSIX shm key (``/name`` or ``name``), refusing anything else."""
    if not isinstance(key, str):
        raise InvalidArgumentError(f"shared memory region {name!r}: 'key' must be a string")
    bare = key[1:] if key.startswith("/") else key
    # shm_open names are one path component: no traversal out of /dev/shm.
    if not bare or "/" in bare or "\0" in bare or bare in (".", "..") or len(bare) > 255:
        raise InvalidArgumentError(
            f"shared memory region {name!r}: invalid key {key!r}; expected a POSIX shared "
            "memory name like '/my_region' (one component, no other '/')"
        )
    return SHM_DIR / bare


class _Region:
    """One registered region: an open descriptor and a mapping of just the region."""

    __slots__ = ("name", "key", "offset", "byte_size", "_fd", "_map", "_start", "_end",
                 "_view", "users", "retired")

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = _object_path(key, name)
        where = f"shared memory region {name!r}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgumentError(
                f"{where}: cannot open shared memory object {key!r}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(f"{where}: {key!r} is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgumentError(
                    f"{where}: offset {offset} + byte_size {byte_size} is beyond the "
                    f"{info.st_size} bytes of shared memory object {key!r}"
                )
            # mmap offsets must be page-aligned: map from the page holding ``offset``.
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._map = mmap.mmap(fd, offset + byte_size - aligned, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._start = offset - aligned
        self._end = self._start + byte_size
        self._view = memoryview(self._map)[self._start : self._end]
        self.users = 0
        self.retired = False

    def check_size(self) -> None:
        """Refuse a region whose object was truncated since registration.

        Touching a page past the end of the object would kill the process
        with SIGBUS; checking per request closes that door for every client
        that does not shrink the object *during* a request.
        """
        size = os.fstat(self._fd).st_size
        if self.offset + self.byte_size > size:
            raise InvalidArgumentError(
                f"shared memory region {self.name!r}: shared memory object {self.key!r} "
                f"shrank to {size} bytes since it was registered (the region needs "
                f"{self.offset + self.byte_size}); unregister and register it again"
            )

    def slice(self, offset: int, byte_size: int, field_where: str) -> memoryview:
        if offset > self.byte_size or byte_size > self.byte_size - offset:
            raise InvalidArgumentError(
                f"{field_where}: {OFFSET} {offset} + {BYTE_SIZE} {byte_size} is beyond "
                f"shared memory region {self.name!r} of {self.byte_size} bytes"
            )
        return self._view[offset : offset + byte_size]

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def close(self) -> None:
        os.close(self._fd)
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            # numpy views of the region are still alive (a response not yet
            # collected): they keep the mapping; it goes when they do.
            pass


class SystemSharedMemory:
    """The registered system shared memory regions of one server (thread-safe)."""

    def __init__(self, *, enabled: bool = False) -> None:
        self.enabled = enabled
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.enabled:
            raise UnsupportedError(_DISABLED)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("a shared memory region needs a non-empty name")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not is_int(value) or value < 0:
                raise InvalidArgumentError(
                    f"shared memory region {name!r}: '{field}' must be a non-negative integer, got {value!r}"
                )
        if byte_size == 0:
            raise InvalidArgumentError(f"shared memory region {name!r}: 'byte_size' must be positive")
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(f"shared memory region {name!r} is already registered")
        region = _Region(name, key, offset, byte_size)  # file I/O outside the lock
        with self._lock:
            if name in self._regions:  # registered meanwhile by another thread
                region.close()
                raise AlreadyExistsError(f"shared memory region {name!r} is already registered")
            self._regions[name] = region

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every region when ``name`` is empty.

        Unknown names are not an error (as in Triton): clients unregister
        defensively before registering. Regions in use close when their last
        request finishes.
        """
        with self._lock:
            if name:
                removed = [self._regions.pop(name)] if name in self._regions else []
            else:
                removed = list(self._regions.values())
                self._regions.clear()
            to_close = []
            for region in removed:
                region.retired = True
                if region.users == 0:
                    to_close.append(region)
        for region in to_close:
            region.close()

    def status(self, name: str = "") -> list[dict[str, Any]]:
        with self._lock:
            if not name:
                return [region.status() for region in self._regions.values()]
            region = self._regions.get(name)
            if region is None:
                raise NotFoundError(f"unknown shared memory region {name!r}")
            return [region.status()]

    def __len__(self) -> int:
        return len(self._regions)

    def lease(self) -> SharedMemoryLease:
        return SharedMemoryLease(self)

    # -- used by leases -----------------------------------------------------------

    def _acquire(self, name: str, where: str) -> _Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                if not self.enabled:
                    raise UnsupportedError(f"{where}: {_DISABLED}")
                raise NotFoundError(f"{where}: unknown shared memory region {name!r}")
            region.users += 1
        try:
            region.check_size()
        except BaseException:
            self._release(region)
            raise
        return region

    def _release(self, region: _Region) -> None:
        with self._lock:
            region.users -= 1
            close = region.retired and region.users == 0
        if close:
            region.close()


class SharedMemoryLease:
    """The regions one request uses, held until the request is done (a context manager)."""

    __slots__ = ("_registry", "_held")

    def __init__(self, registry: SystemSharedMemory) -> None:
        self._registry = registry
        self._held: dict[str, _Region] = {}

    def _region(self, name: str, where: str) -> _Region:
        region = self._held.get(name)
        if region is None:
            region = self._held[name] = self._registry._acquire(name, where)
        return region

    def read_input(
        self, region: str, offset: int, byte_size: int, datatype: str, shape: tuple[int, ...],
        *, tensor: str,
    ) -> np.ndarray:
        """The input ``tensor`` as a read-only view of the region (BYTES: decoded, a copy).

        ``byte_size`` must be exactly what ``shape`` of ``datatype`` takes
        (for BYTES: the length-prefixed elements, nothing after them).
        """
        where = f"input {tensor!r}"
        view = self._region(region, where).slice(offset, byte_size, where)
        array = tensor_from_bytes(view.toreadonly(), shape, datatype, tensor,
                                  source=f"{BYTE_SIZE} in region {region!r}")
        return array

    def check_output(self, region: str, offset: int, byte_size: int, *, tensor: str) -> None:
        """Fail before the model runs if the output's region is unknown or out of bounds."""
        where = f"output {tensor!r}"
        self._region(region, where).slice(offset, byte_size, where)

    def write_output(
        self, region: str, offset: int, byte_size: int, array: np.ndarray, datatype: str,
        *, tensor: str,
    ) -> int:
        """Copy output ``tensor`` into the region; returns the bytes written.

        Fixed-size tensors are copied straight into the mapping (one copy);
        BYTES are serialized first. 400 if they do not fit in ``byte_size``.
        """
        where = f"output {tensor!r}"
        view = self._region(region, where).slice(offset, byte_size, where)
        if datatype == "BYTES":
            raw = tensor_to_bytes(array, datatype)
            needed = len(raw)
        else:
            raw = None
            needed = element_count(array.shape) * numpy_dtype(datatype).itemsize
        if needed > byte_size:
            raise InvalidArgumentError(
                f"{where}: {needed} bytes do not fit in shared memory region {region!r} "
                f"({BYTE_SIZE} {byte_size} at {OFFSET} {offset})"
            )
        if raw is not None:
            view[:needed] = raw
        elif needed:
            target = np.frombuffer(view, dtype=numpy_dtype(datatype), count=array.size).reshape(array.shape)
            np.copyto(target, array, casting="no")
        return needed

    def release(self) -> None:
        held, self._held = self._held, {}
        for region in held.values():
            self._registry._release(region)

    def __enter__(self) -> SharedMemoryLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
