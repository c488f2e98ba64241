"""HTTP/2 on the wire (RFC 9113, RFC 7541): frame layout, constants, HPACK.

No I/O here: ``transports/http2.py`` (the server connection) and
``perf/grpc_h2.py`` (the load generator's gRPC client) are built on it. What
we send never uses HPACK's dynamic table (literals and static-table indexes
only), so header blocks can be built once and reused; what we receive is
decoded by the ``hpack`` library, with a cache for blocks that leave the table
as it was (gRPC peers repeat the same block on every call).
"""

from __future__ import annotations

import struct

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
# Settings identifiers (section 6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384

_FRAME_HEAD = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
SETTING = struct.Struct(">HL")
U32 = struct.Struct(">L")


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: the 9-byte head and the payload."""
    size = len(payload)
    return _FRAME_HEAD.pack(size >> 8, size & 0xFF, frame_type, flags, stream_id) + payload


def frame_head(frame_type: int, flags: int, stream_id: int, size: int) -> bytes:
    return _FRAME_HEAD.pack(size >> 8, size & 0xFF, frame_type, flags, stream_id)


# -- HPACK, sending side: literals only, never indexed ---------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1) with ``first``'s high bits set."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as 'literal without indexing, new name' (section 6.2.2), no Huffman.

    Nothing we send touches the peer's dynamic table, so the blocks can be
    built once and reused on every connection.
    """
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


#: ``:status: 200`` is entry 8 of HPACK's static table.
STATUS_200 = b"\x88"
#: A dynamic table size update to 0 (section 6.3), sent once per connection so
#: that whatever HEADER_TABLE_SIZE the peer announces, our (empty) table fits it.
TABLE_SIZE_ZERO = b"\x20"


class HeaderBlockDecoder:
    """HPACK decoding for one connection, caching what repeats.

    A block that leaves the dynamic table untouched (indexed fields, literals
    without indexing) always decodes the same while the table is unchanged.
    Such blocks are cached; a block that changes the table (or its size)
    empties the cache. "Unchanged" is checked by identity of the newest table
    entry (held, so its identity cannot be reused), the entry count and the size.
    """

    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self.max_header_list_size = max_header_list_size
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        table = self.decoder.header_table
        entries = table.dynamic_entries
        first = entries[0] if entries else None
        count, size = len(entries), table.maxsize
        headers = self.decoder.decode(block)
        if (entries[0] if entries else None) is first and len(entries) == count and table.maxsize == size:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[block] = headers
        else:
            self._cache.clear()
        return headers


def hpack_literal_indexed(name_index: int, value: bytes) -> bytes:
    """A header as 'literal without indexing, indexed name' (static table entry ``name_index``)."""
    return _hpack_int(name_index, 4) + _hpack_int(len(value), 7) + value
