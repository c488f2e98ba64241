"""Server <-> worker transport: small control messages on a socket, tensors in shared memory.

Control messages travel over a Unix stream socket as a 9-byte header (kind,
payload length) and a pickled payload that holds only names, shapes, dtypes
and offsets — never tensor data. Tensor bytes are copied once into a shared
memory *arena* owned by the sender and read in place by the receiver.

Arenas are anonymous memory files (``memfd_create``; an unlinked file under
``/dev/shm`` elsewhere) whose descriptors are passed over the socket with
``SCM_RIGHTS``. Nothing has a name in the file system, so a worker killed by a
segfault leaks nothing: the memory is freed when the last descriptor and
mapping go away. An arena grows (a new file, announced with its descriptor)
when a message does not fit; it is otherwise reused for every message, which
is safe because each arena is used by exactly one request/reply exchange at a
time (see the channel names in :mod:`inferstack.python_backend.worker`).
"""

from __future__ import annotations

import array
import mmap
import os
import pickle
import socket
import struct
import tempfile
from collections import deque
from typing import Any

import numpy as np

# Message kinds.
INIT = 1  # server -> worker: args; worker answers READY or ERROR
EXECUTE = 2  # server -> worker: one batch; worker answers RESULT or ERROR
SHUTDOWN = 3  # server -> worker: finalize and exit; worker answers READY
BLS_REPLY = 4  # server -> worker: the answer to a BLS request
READY = 10  # worker -> server
RESULT = 11  # worker -> server
ERROR = 12  # worker -> server: the whole call failed
BLS_REQUEST = 13  # worker -> server: infer on another model
SEGMENT = 20  # either way: the descriptor of a new arena travels with this message

_HEADER = struct.Struct("<BQ")
_ALIGN = 64
_MIN_ARENA = 1 << 20
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None

#: A tensor in a message: (name, dtype str or "BYTES", shape, offset, nbytes).
TensorRef = tuple[str, str, tuple[int, ...], int, int]


class ChannelClosed(ConnectionError):
    """The peer went away (a dead worker, or the server closing the socket)."""


class Channel:
    """Framed messages plus passed descriptors over one connected Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def send(self, kind: int, payload: Any = None, fd: int | None = None) -> None:
        data = pickle.dumps(payload, protocol=5)
        frame = _HEADER.pack(kind, len(data)) + data
        try:
            if fd is None:
                self.sock.sendall(frame)
            else:
                sent = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                if sent < len(frame):
                    self.sock.sendall(frame[sent:])
        except OSError as exc:
            raise ChannelClosed(f"cannot send to the peer: {exc}") from None

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
            except OSError as exc:
                raise ChannelClosed(f"cannot read from the peer: {exc}") from None
            for level, type_, blob in ancillary:
                if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise ChannelClosed("the peer closed the connection")
            self._buffer += data

    def recv(self) -> tuple[int, Any, int | None]:
        """The next message: (kind, payload, passed descriptor or None)."""
        self._fill(_HEADER.size)
        kind, length = _HEADER.unpack_from(self._buffer)
        self._fill(_HEADER.size + length)
        payload = pickle.loads(memoryview(self._buffer)[_HEADER.size:_HEADER.size + length])
        del self._buffer[: _HEADER.size + length]
        fd = self._fds.popleft() if kind == SEGMENT and self._fds else None
        return kind, payload, fd

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            while self._fds:
                os.close(self._fds.popleft())


class Endpoint:
    """One side of a connection: the channel, its arenas and the peer's segments."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.segments = Segments()
        self._arenas: dict[int, Arena] = {}

    def arena(self, channel_id: int) -> Arena:
        arena = self._arenas.get(channel_id)
        if arena is None:
            arena = self._arenas[channel_id] = Arena(channel_id)
        return arena

    def write(self, channel_id: int, tensors: list[tuple[str, np.ndarray]]) -> list[TensorRef]:
        return self.arena(channel_id).write(self.channel, tensors)

    def recv(self) -> tuple[int, Any]:
        """The next message that is not a segment announcement (those are adopted here)."""
        while True:
            kind, payload, fd = self.channel.recv()
            if kind == SEGMENT:
                self.segments.adopt(payload, fd)
                continue
            return kind, payload


def _anonymous_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("inferstack-tensors", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile(dir=_SHM_DIR) as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, size)
    return fd


class Arena:
    """The sending side of one shared memory channel (reused for every message)."""

    def __init__(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self.generation = 0
        self._map: mmap.mmap | None = None
        self.size = 0

    def write(self, channel: Channel, tensors: list[tuple[str, np.ndarray]]) -> list[TensorRef]:
        """Copy tensors into the arena (growing it first if needed); their references."""
        prepared: list[tuple[str, np.ndarray | bytes, str, tuple[int, ...], int, int]] = []
        total = 0
        for name, value in tensors:
            if not isinstance(value, np.ndarray):
                value = np.asarray(value)
            if value.dtype.kind in "OSU":
                data: np.ndarray | bytes = serialize_bytes(value)
                dtype = "BYTES"
                nbytes = len(data)
            else:
                data = value if value.flags.c_contiguous else np.ascontiguousarray(value)
                dtype = value.dtype.str
                nbytes = value.nbytes
            prepared.append((name, data, dtype, value.shape, total, nbytes))
            total += (nbytes + _ALIGN - 1) & -_ALIGN
        if total > self.size:
            self._grow(channel, total)
        mapped = self._map
        refs: list[TensorRef] = []
        for name, data, dtype, shape, offset, nbytes in prepared:
            if nbytes:
                # A contiguous array exports its bytes as a simple buffer: one memcpy.
                mapped[offset:offset + nbytes] = data  # type: ignore[index]
            refs.append((name, dtype, shape, offset, nbytes))
        return refs

    def _grow(self, channel: Channel, need: int) -> None:
        size = max(_MIN_ARENA, need, self.size * 2)
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = _anonymous_file(size)
        try:
            mapped = mmap.mmap(fd, size)
            self.generation += 1
            channel.send(SEGMENT, (self.channel_id, self.generation, size), fd=fd)
        finally:
            os.close(fd)
        # The previous map is dropped, not closed: views the peer handed back may
        # still point into it (they keep it alive until they go away).
        self._map = mapped
        self.size = size


class Segments:
    """The receiving side: the latest arena of each channel, mapped once."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}

    def adopt(self, payload: tuple[int, int, int], fd: int | None) -> None:
        if fd is None:
            raise ChannelClosed("a shared memory segment arrived without its descriptor")
        channel_id, _generation, size = payload
        try:
            self._maps[channel_id] = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def read(self, channel_id: int, refs: list[TensorRef], *, copy: bool) -> list[tuple[str, np.ndarray]]:
        """Arrays for the references: views into the arena, or copies when ``copy``."""
        mapped = self._maps.get(channel_id)
        if mapped is None and refs:
            raise ChannelClosed(f"tensors referenced on channel {channel_id}, which has no segment")
        out: list[tuple[str, np.ndarray]] = []
        for name, dtype, shape, offset, nbytes in refs:
            if dtype == "BYTES":
                out.append((name, deserialize_bytes(mapped[offset:offset + nbytes], shape)))  # type: ignore[index]
                continue
            if nbytes == 0:
                out.append((name, np.empty(shape, np.dtype(dtype))))
                continue
            view = np.ndarray(shape, _dtype(dtype), buffer=mapped, offset=offset)  # type: ignore[call-overload]
            out.append((name, view.copy() if copy else view))
        return out


_DTYPES: dict[str, np.dtype] = {}


def _dtype(name: str) -> np.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype


def serialize_bytes(value: np.ndarray) -> bytes:
    """Triton's BYTES layout: each element as a 4-byte little-endian length and its bytes."""
    parts: list[bytes] = []
    for item in value.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    view = memoryview(data)
    while offset < len(view):
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        items.append(bytes(view[offset:offset + length]))
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)
