"""The Python backend's transport: framing, passed descriptors, arenas that grow, every dtype."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from inferstack.python_backend import ipc


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = ipc.Endpoint(ipc.Channel(a)), ipc.Endpoint(ipc.Channel(b))
    yield left, right
    left.channel.close()
    right.channel.close()


TENSORS = [
    ("f32", np.arange(12, dtype=np.float32).reshape(3, 4)),
    ("transposed", np.arange(12, dtype=np.float64).reshape(3, 4).T),  # not contiguous
    ("big_endian", np.arange(5, dtype=">i4")),
    ("bool", np.array([True, False])),
    ("fp16", np.ones((2, 2), np.float16)),
    ("bytes", np.array([[b"ab", b""], [b"xyz", "q\u00e9".encode()]], dtype=np.object_)),
    ("empty", np.zeros((0, 3), np.float32)),
    ("scalar", np.array(3.5)),
]


def test_every_dtype_round_trips_and_views_are_zero_copy(pair) -> None:
    left, right = pair
    refs = left.write(1, TENSORS)
    left.channel.send(ipc.EXECUTE, refs)
    kind, got = right.recv()
    assert kind == ipc.EXECUTE
    out = right.segments.read(1, got, copy=False)
    for (name, sent), (got_name, received) in zip(TENSORS, out):
        assert got_name == name
        assert received.shape == sent.shape and received.dtype == sent.dtype, name
        np.testing.assert_array_equal(received, sent)
    # A view reads the arena in place: the next message's data shows through it.
    view = out[0][1]
    refs = left.write(1, [("f32", np.full((3, 4), 7, np.float32))])
    assert np.all(view == 7)


def test_arena_grows_and_old_views_stay_valid(pair) -> None:
    left, right = pair
    small = np.arange(10, dtype=np.float32)
    left.channel.send(ipc.EXECUTE, left.write(2, [("x", small)]))
    _, refs = right.recv()
    old_view = right.segments.read(2, refs, copy=False)[0][1]
    size = left.arena(2).size
    big = np.random.default_rng(0).random(size // 8 + 1000)  # does not fit: a new segment
    left.channel.send(ipc.EXECUTE, left.write(2, [("x", big)]))
    _, refs = right.recv()
    assert left.arena(2).size > size and left.arena(2).generation == 2
    np.testing.assert_array_equal(right.segments.read(2, refs, copy=True)[0][1], big)
    np.testing.assert_array_equal(old_view, small)  # the old mapping is kept alive by the view


def test_closed_peer_is_reported(pair) -> None:
    left, right = pair
    left.channel.close()
    with pytest.raises(ipc.ChannelClosed):
        right.recv()
